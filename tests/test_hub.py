"""Hub caches, pull and first-use download, against local fakes of each hub's cache layout.

No test touches the network: a hub that must be unreachable is pointed at a closed port
on 127.0.0.1 (HF_ENDPOINT, MODELSCOPE_ENDPOINT), downloads come from a local imitation
of the Hugging Face Hub's file API (tests/fixtures/fake_hf.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gateway.registry.config import ModelEntry
from gateway.registry.hub import locate, missing_message, remote_code_warnings
from gateway.worker.pull import _bytes_under, progress_text
from tests.fixtures.fake_hf import COMMIT as COMMIT_FAKE
from tests.fixtures.fake_hf import FakeHub
from tests.support import ROOT, Gateway, free_port, write_config

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hf_snapshot(cache: Path, repo: str, revision: str = "main", files: Path | None = None) -> Path:
    """Lay out `repo` as huggingface_hub caches it: blobs, a snapshot of links, a ref."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (folder / "blobs").mkdir()
    sources = sorted(files.iterdir()) if files else []
    for index, source in enumerate(sources or [None]):
        name = source.name if source else "config.json"
        blob = folder / "blobs" / f"blob{index}"
        blob.write_bytes(source.read_bytes() if source else b"{}")
        (snapshot / name).symlink_to(Path("..", "..", "blobs", blob.name))
    (folder / "refs").mkdir()
    (folder / "refs" / revision).write_text(COMMIT)
    return snapshot


def modelscope_snapshot(cache: Path, repo: str, legacy: bool = False) -> Path:
    owner, name = repo.split("/")
    if legacy:  # modelscope <= 1.37 wrote dots in names as ___
        snapshot = cache / "models" / owner / name.replace(".", "___")
    else:
        snapshot = cache / "models" / f"{owner}--{name}" / "snapshots" / "master"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    return snapshot


def entry(hub: str, cache: Path, **fields: object) -> ModelEntry:
    return ModelEntry.model_validate({"source": "x", "hub": hub, "cache_dir": str(cache), **fields})


def test_huggingface_layout_is_found_where_huggingface_hub_finds_it(tmp_path: Path) -> None:
    from huggingface_hub import snapshot_download

    snapshot = hf_snapshot(tmp_path, "org/tiny")
    theirs = snapshot_download("org/tiny", cache_dir=tmp_path, local_files_only=True)
    assert locate(entry("huggingface", tmp_path), "org/tiny", Path("/unused")) == Path(theirs)
    assert Path(theirs) == snapshot
    pinned = entry("huggingface", tmp_path, revision=COMMIT)
    assert locate(pinned, "org/tiny", Path("/unused")) == snapshot
    assert locate(entry("huggingface", tmp_path, revision="v2"), "org/tiny", Path("/x")) is None


def test_modelscope_layouts_are_found_where_modelscope_finds_them(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from modelscope.hub.snapshot_download import snapshot_download

    for repo, legacy in (("org/tiny", False), ("org/old.model", True)):
        snapshot = modelscope_snapshot(tmp_path, repo, legacy)
        theirs = snapshot_download(repo, cache_dir=str(tmp_path), local_files_only=True)
        assert Path(theirs) == snapshot
        assert locate(entry("modelscope", tmp_path), repo, Path("/unused")) == snapshot


def test_the_seed_scripts_download_folder_is_found(tmp_path: Path) -> None:
    # snapshot_download('deepseek-ai/deepseek-moe-16b-chat', cache_dir='/root/autodl-tmp')
    seed = tmp_path / "deepseek-ai" / "deepseek-moe-16b-chat"
    seed.mkdir(parents=True)
    (seed / "config.json").write_text("{}")
    found = locate(entry("modelscope", tmp_path), "deepseek-ai/deepseek-moe-16b-chat", tmp_path)
    assert found == seed


def test_default_caches_live_under_the_gateway_cache(tmp_path: Path) -> None:
    a = hf_snapshot(tmp_path / "huggingface" / "hub", "org/a")
    b = modelscope_snapshot(tmp_path / "modelscope", "org/b")
    assert locate(ModelEntry(source="x", hub="huggingface"), "org/a", tmp_path) == a
    assert locate(ModelEntry(source="x", hub="modelscope"), "org/b", tmp_path) == b
    assert locate(ModelEntry(source="x", hub="modelscope"), "org/a", tmp_path) is None


def test_missing_weights_say_how_to_pull_them() -> None:
    auto = ModelEntry(source="org/m", hub="modelscope")
    manual = ModelEntry(source="org/m", hub="modelscope", auto_pull=False)
    assert missing_message("m", auto, "org/m").endswith("run `llm-gateway pull m`")
    assert "auto_pull` is off; run `llm-gateway pull m`" in missing_message("m", manual, "org/m")


def test_remote_code_from_a_moving_revision_is_warned_about() -> None:
    models = {
        "branch": ModelEntry(source="o/a", hub="modelscope", trust_remote_code=True),
        "tag": ModelEntry(source="o/b", hub="huggingface", trust_remote_code=True, revision="v1"),
        "pinned": ModelEntry(
            source="o/c", hub="huggingface", trust_remote_code=True, revision=COMMIT
        ),
        "no-code": ModelEntry(source="o/d", hub="huggingface"),
        "local": ModelEntry(source="/m", trust_remote_code=True),
    }
    warned = remote_code_warnings(models)
    assert [w.split(":")[0] for w in warned] == ["models.branch", "models.tag"]
    assert "revision 'v1'" in warned[1] and "commit hash" in warned[1]


def test_check_warns_about_the_shipped_seed_entries_but_passes(tmp_path: Path) -> None:
    (tmp_path / ".cache" / "demo-model").mkdir(parents=True)  # as `make demo` leaves it
    config = tmp_path / "models.yaml"
    config.write_text((ROOT / "models.yaml").read_text())
    check = subprocess.run(
        [sys.executable, "-m", "gateway", "check", "--config", str(config)],
        capture_output=True, text=True, cwd=ROOT, check=False,
    )  # fmt: skip
    assert check.returncode == 0
    assert "warning: models.deepseek-moe: trust_remote_code" in check.stderr


def test_pull_of_an_unreachable_hub_fails_at_once(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        f"""
        gateway: {{cache_dir: {tmp_path / "cache"}}}
        models:
          ms: {{source: org/m, hub: modelscope}}
          hf: {{source: org/m, hub: huggingface}}
        """,
    )
    closed = f"http://127.0.0.1:{free_port()}"
    env = {**os.environ, "MODELSCOPE_ENDPOINT": closed, "HF_ENDPOINT": closed}
    for name, hub in (("ms", "modelscope"), ("hf", "huggingface")):
        pull = subprocess.run(
            [sys.executable, "-m", "gateway", "pull", name, "--config", str(config)],
            capture_output=True, text=True, cwd=ROOT, env={**env, "HF_HUB_OFFLINE": "0"},
            timeout=60, check=False,
        )  # fmt: skip
        assert pull.returncode == 1
        assert f"{name}: cannot reach the {hub} hub at 127.0.0.1:" in pull.stderr
        assert "Connection refused" in pull.stderr
    assert not (tmp_path / "cache").exists()  # nothing half-made


def test_pull_finds_a_snapshot_already_there(tmp_path: Path) -> None:
    hf_snapshot(tmp_path / "cache" / "huggingface" / "hub", "org/m")
    config = write_config(
        tmp_path, f"gateway: {{cache_dir: {tmp_path / 'cache'}}}\nmodels:\n  m: {{source: org/m, "
        "hub: huggingface}\n",
    )  # fmt: skip
    pull = subprocess.run(
        [sys.executable, "-m", "gateway", "pull", "m", "--config", str(config)],
        capture_output=True, text=True, cwd=ROOT, check=False,
    )  # fmt: skip
    assert pull.returncode == 0
    assert f"snapshots/{COMMIT}: nothing to pull" in pull.stdout


def test_served_from_a_hub_cache_failing_fast_or_asking_for_a_pull(
    tiny_model: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    hf_snapshot(cache / "huggingface" / "hub", "org/tiny", files=tiny_model)
    config = write_config(
        tmp_path,
        f"""
        gateway: {{cache_dir: {cache}}}
        models:
          cached: {{source: org/tiny, hub: huggingface}}
          manual: {{source: org/absent, hub: huggingface, auto_pull: false}}
          auto: {{source: org/absent, hub: huggingface}}
        """,
    )
    closed = f"http://127.0.0.1:{free_port()}"
    with Gateway(config, env={"HF_ENDPOINT": closed, "HF_HUB_OFFLINE": "0"}) as gw:
        assert gw.post("/cached", {"prompt": "hi", "max_length": 3}).status_code == 200
        manual = gw.post("/manual", {"prompt": "hi"})
        assert manual.status_code == 503
        assert "run `llm-gateway pull manual`" in manual.json()["error"]["message"]
        auto = gw.post("/auto", {"prompt": "hi"})
        assert auto.status_code == 503
        assert "cannot reach the huggingface hub at 127.0.0.1" in auto.json()["error"]["message"]
        card = gw.models()["auto"]
        assert card["state"] == "failed"
        assert card["progress"]["stage"] == "download"  # it was pulling on first use


def test_progress_counts_each_downloaded_byte_once(tmp_path: Path) -> None:
    snapshot = hf_snapshot(tmp_path, "org/m", files=ROOT / "configs" / "deepseek-moe-16b-chat")
    blobs = sum(p.stat().st_size for p in (snapshot.parent.parent / "blobs").iterdir())
    ref = len(COMMIT)  # refs/main
    assert _bytes_under(snapshot.parent.parent) == blobs + ref  # the snapshot's links are not
    half = progress_text(512 * 2**20, 2**30, 2.0)
    assert half.startswith("[" + "#" * 15 + "." * 15 + "]  50.0%  512.0/1024.0 MiB")
    assert progress_text(3 * 2**20, None, 1.0) == "3.0 MiB  3.0 MiB/s"


def test_pull_downloads_through_the_hub_api_with_a_progress_bar(
    tiny_model: Path, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path,
        f"gateway: {{cache_dir: {tmp_path / 'cache'}}}\n"
        "models:\n  m: {source: org/tiny, hub: huggingface}\n",
    )
    with FakeHub("org/tiny", tiny_model, chunk=8192, pause_s=0.06) as hub:
        pull = subprocess.run(
            [sys.executable, "-m", "gateway", "pull", "m", "--config", str(config)],
            capture_output=True, text=True, cwd=ROOT, timeout=120, check=False,
            env={**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0"},
        )  # fmt: skip
    assert pull.returncode == 0, pull.stderr
    bars = [line for line in pull.stderr.splitlines() if line.startswith("m: [")]
    # About 3 s of download, sampled twice a second: a line per new tenth, then the end.
    assert len(bars) >= 2 and bars[-1].startswith("m: [" + "#" * 30 + "] 100.0%")
    assert "Fetching" not in pull.stderr  # the library's own bars are off: one bar, ours
    snapshot = tmp_path / "cache" / "huggingface" / "hub" / "models--org--tiny" / "snapshots"
    assert f"m: downloaded to {snapshot / COMMIT_FAKE}" in pull.stderr
    got = snapshot / COMMIT_FAKE / "model.safetensors"
    assert got.read_bytes() == (tiny_model / "model.safetensors").read_bytes()
    entry_ = ModelEntry(source="org/tiny", hub="huggingface")
    assert locate(entry_, "org/tiny", tmp_path / "cache") == snapshot / COMMIT_FAKE


def test_first_use_pulls_and_shows_progress_in_state_and_log(
    tiny_model: Path, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path,
        f"gateway: {{cache_dir: {tmp_path / 'cache'}}}\n"
        "models:\n  m: {source: org/tiny, hub: huggingface}\n",
    )
    with (
        FakeHub("org/tiny", tiny_model, chunk=8192, pause_s=0.06) as hub,
        Gateway(config, env={"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0"}) as gw,
        ThreadPoolExecutor(1) as pool,
    ):
        reply = pool.submit(gw.post, "/m", {"prompt": "hi", "max_length": 3})
        seen = []
        while not reply.done():
            progress = gw.models()["m"]["progress"]
            if progress and progress["stage"] == "download":
                seen.append(progress)
            time.sleep(0.05)
        assert reply.result().status_code == 200
        assert any(p["fraction"] is not None and 0 <= p["fraction"] <= 1 for p in seen)
        assert gw.models()["m"]["state"] == "ready"
    assert "[m] download huggingface:org/tiny: [" in gw.log.read_text()
