"""Each CPU worker's intra-op threads: its share of the cores, chosen by the gateway."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.backends import threads
from gateway.registry.config import ModelEntry
from tests.support import Gateway, write_config

CPU = ModelEntry(source="/m")
GPU = ModelEntry(source="/m", devices=[0])


@pytest.mark.parametrize(
    ("cores", "workers", "expected"),
    [(1, 1, 1), (2, 1, 1), (2, 2, 1), (8, 1, 7), (8, 2, 3), (8, 3, 2), (8, 9, 1), (64, 4, 15)],
)
def test_cpu_workers_share_the_cores_less_one_for_the_gateway(
    cores: int, workers: int, expected: int
) -> None:
    assert threads.share(CPU, workers, cores) == expected


def test_a_workers_threads_never_outnumber_the_cores() -> None:
    for cores in range(1, 17):
        for workers in range(1, 6):
            assert 1 <= (threads.share(CPU, workers, cores) or 0) <= cores


def test_an_entrys_threads_win_and_gpu_workers_keep_torchs_default() -> None:
    assert threads.share(ModelEntry(source="/m", threads=5), 3, 4) == 5
    assert threads.share(GPU, 1, 8) is None
    assert threads.share(ModelEntry(source="/m", devices=[0], threads=2), 1, 8) == 2
    by_hand = ModelEntry(source="/m", env={"OMP_NUM_THREADS": "3"})
    assert threads.share(by_hand, 1, 8) == 3  # the entry's own env says it
    assert threads.share(ModelEntry(source="/m", env={"OMP_NUM_THREADS": "x"}), 1, 8) == 7
    assert threads.environment(None) == {}
    assert threads.environment(3) == {
        "OMP_NUM_THREADS": "3",
        "MKL_NUM_THREADS": "3",
        threads.THREADS_ENV: "3",
    }


def test_two_cpu_workers_started_together_count_each_other() -> None:
    shares = threads.CoreShares(cores=9)
    first = shares.claim(CPU)  # its process has not started yet
    second = shares.claim(CPU)
    gpu = shares.claim(GPU)
    assert (first.threads, second.threads, gpu.threads) == (8, 4, None)
    assert shares.running == 2
    first.release()
    first.release()  # a second release (exit after a failed start) counts once
    gpu.release()
    assert shares.running == 1
    assert shares.claim(CPU).threads == 4


def test_a_cgroup_cpu_quota_narrows_the_cores(tmp_path: Path) -> None:
    import os

    affinity = len(os.sched_getaffinity(0))
    quota = tmp_path / "cpu.max"
    quota.write_text("100000 100000\n")
    assert threads.available_cores(quota) == 1
    quota.write_text("max 100000\n")
    assert threads.available_cores(quota) == affinity
    assert threads.available_cores(tmp_path / "absent") == affinity


def test_threads_must_be_positive() -> None:
    with pytest.raises(ValueError, match="threads"):
        ModelEntry(source="/m", threads=0)


def worker_environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def test_each_worker_runs_with_its_thread_share_and_models_shows_it(
    tiny_model: Path, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path,
        f"""
        models:
          shared:
            source: {tiny_model}
          pinned:
            source: {tiny_model}
            threads: 2
        """,
    )
    # The gateway's own OMP_NUM_THREADS is not what its workers get.
    with Gateway(config, env={"OMP_NUM_THREADS": "7"}) as gateway:
        for name in ("shared", "pinned"):  # one at a time: `shared` is alone when it starts
            body = {"prompt": "hi", "max_length": 2}
            assert gateway.post(f"/{name}", body).status_code == 200
        cards = gateway.models()
        alone = threads.share(CPU, 1, threads.available_cores())
        assert cards["shared"]["runtime"]["threads"] == alone
        assert cards["pinned"]["runtime"]["threads"] == 2
        environ = worker_environ(cards["pinned"]["runtime"]["pid"])
        assert environ["OMP_NUM_THREADS"] == environ["MKL_NUM_THREADS"] == "2"
        assert worker_environ(cards["shared"]["runtime"]["pid"])["OMP_NUM_THREADS"] == str(alone)
