"""The generation thread's hand-off to the event loop: in order, one wake-up per burst."""

from __future__ import annotations

import asyncio
import gc
import threading
from functools import partial

from gateway.worker.mailbox import Mailbox, Mailboxes


class CountingMailbox(Mailbox):
    wakeups = 0

    def _drain(self) -> None:
        self.wakeups += 1
        super()._drain()


def test_a_burst_of_posts_wakes_the_loop_once_and_keeps_its_order() -> None:
    async def main() -> tuple[list[int], int]:
        box = CountingMailbox(asyncio.get_running_loop())
        got: list[int] = []
        for i in range(100):  # all posted before the loop runs again: one burst
            box.post(partial(got.append, i))
        for _ in range(3):
            await asyncio.sleep(0)
        return got, box.wakeups

    got, wakeups = asyncio.run(main())
    assert got == list(range(100))
    assert wakeups == 1


def test_posts_from_another_thread_all_arrive_in_order() -> None:
    async def main() -> list[int]:
        box = Mailbox(asyncio.get_running_loop())
        got: list[int] = []
        done = asyncio.Event()

        def producer() -> None:
            for i in range(5000):
                box.post(partial(got.append, i))
            box.post(done.set)

        thread = threading.Thread(target=producer)
        thread.start()
        await asyncio.wait_for(done.wait(), 10)
        thread.join()
        return got

    assert asyncio.run(main()) == list(range(5000))


def test_each_event_loop_gets_its_own_mailbox_which_goes_with_the_loop() -> None:
    boxes = Mailboxes()
    first, second = asyncio.new_event_loop(), asyncio.new_event_loop()
    box = boxes.for_loop(first)
    assert boxes.for_loop(first) is box
    assert boxes.for_loop(second) is not box
    first.close()
    second.close()
    del first, second, box
    gc.collect()
    assert not list(boxes._boxes)  # a mailbox must not keep its loop alive
