"""``vlmhub cache`` and ``vlmhub pull``: the real command (a subprocess) against a stand-in
Hugging Face Hub on loopback (``HF_ENDPOINT``), a real cache folder, and Docker for the image
(a pull that cannot succeed here: no registry is reachable, so its error is what is tested)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hub_support import FakeHub, Repo

VLMHUB = str(Path(sys.executable).parent / "vlmhub")
WEIGHTS = b"\x00" * 300_000
TINY = {"config.json": b'{"model_type": "tiny"}', "model.safetensors": WEIGHTS,
        "tokenizer/tokenizer.json": b"{}"}
SECRET = "hf_fake_token_for_tests"


def spec(repo: str, **extra: Any) -> dict[str, Any]:
    return {"hf_repo": repo, "image": "127.0.0.1:1/vlmhub/no-such-engine:v1",
            "options": {"max_model_len": 2048},
            "vram": {"weights_gib": 1, "kv_bytes_per_token": 1024}, **extra}


def write_config(tmp_path: Path, kind: str = "process") -> Path:
    config = {
        "gpu": {"total_gib": 8},
        "runtime": {"kind": kind, "hf_cache": str(tmp_path / "hf"),
                    "process_argv": ["{python}", "-m", "vlmhub.testing.stub_engine"]},
        "models": {"tiny": {"spec": spec("org/tiny")},
                   "gated": {"spec": spec("org/gated")},
                   "configonly": {"spec": spec("org/config-only")},
                   "ghost": {"spec": spec("org/ghost")}},
    }
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def hub() -> FakeHub:
    return FakeHub({"org/tiny": Repo(TINY, lfs=("model.safetensors",)),
                    "org/gated": Repo(TINY, gated=True, lfs=("model.safetensors",)),
                    "org/config-only": Repo({"config.json": b"{}"}),
                    "someone/unrelated": Repo({"data.bin": b"\x01" * 4096},
                                              commit="f" * 40)},
                   token=SECRET)


def run(tmp_path: Path, *args: str, endpoint: str | None = None, **env: str
        ) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("HF_") and k not in ("COLUMNS", "DOCKER_HOST")}
    base |= {"HF_HOME": str(tmp_path / "hf-home"), "NO_COLOR": "1",
             "HF_HUB_DISABLE_TELEMETRY": "1", "VLMHUB_STATE_DIR": str(tmp_path / "state")}
    if endpoint:
        base["HF_ENDPOINT"] = endpoint
    return subprocess.run([VLMHUB, *args, "--config", str(tmp_path / "models.yaml")],
                          cwd=tmp_path, env=base | env, capture_output=True, text=True,
                          timeout=120, check=False, stdin=subprocess.DEVNULL)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens there once closed


def test_cache_on_a_missing_or_empty_cache_says_so_and_exits_0(tmp_path: Path) -> None:
    write_config(tmp_path)
    cache = tmp_path / "hub-cache"
    missing = run(tmp_path, "cache", "--cache-dir", str(cache))
    assert missing.returncode == 0, missing.stderr
    assert f"No Hugging Face cache at {cache}" in missing.stdout
    assert "vlmhub pull MODEL" in missing.stdout
    data = json.loads(run(tmp_path, "cache", "--json", "--cache-dir", str(cache)).stdout)
    assert data["exists"] is False and data["other"] == []
    statuses = {m["model"]: m["status"] for m in data["models"]}
    assert statuses["tiny"] == statuses["dots-ocr"] == statuses["qwen3-vl:4b-fp8"] == "missing"
    assert statuses["dots-ocr:fp8"] == "missing"  # variants listed too
    cache.mkdir()
    empty = run(tmp_path, "cache", "--cache-dir", str(cache))
    assert empty.returncode == 0 and "is empty" in empty.stdout


def test_pull_fetches_the_weights_and_cache_lists_them(tmp_path: Path) -> None:
    write_config(tmp_path)  # process runtime: the cache is HF_HOME's
    with hub().serve() as fake:
        pulled = run(tmp_path, "pull", "tiny", endpoint=fake.url)
        assert pulled.returncode == 0, pulled.stdout + pulled.stderr
        configonly = run(tmp_path, "pull", "configonly", "--no-image", endpoint=fake.url)
        assert configonly.returncode == 0, configonly.stderr
        # another repo, fetched by something else into the same cache
        from huggingface_hub import snapshot_download
        snapshot_download("someone/unrelated", cache_dir=tmp_path / "hf-home" / "hub",
                          endpoint=fake.url, token=False)
        again = run(tmp_path, "pull", "tiny", "--no-image", endpoint=fake.url)
    assert "weights ready" in pulled.stdout
    assert "no engine image to pull" in pulled.stdout  # the process runtime
    snapshot = tmp_path / "hf-home" / "hub" / "models--org--tiny" / "snapshots" / Repo(TINY).commit
    assert (snapshot / "model.safetensors").read_bytes() == WEIGHTS
    assert (snapshot / "tokenizer" / "tokenizer.json").read_bytes() == b"{}"
    assert f"weights ready {snapshot}" in pulled.stdout
    gets = [r for r in fake.requests if r.startswith("GET /org/tiny/resolve/")]
    assert len(gets) == 3  # each file once: the second pull found them all in the cache
    assert again.returncode == 0

    data = json.loads(run(tmp_path, "cache", "--json").stdout)
    assert data["cache_dir"] == str(tmp_path / "hf-home" / "hub")
    models = {m["model"]: m for m in data["models"]}
    tiny = models["tiny"]
    assert tiny["status"] == "present" and tiny["repo"] == "org/tiny"
    assert tiny["size_bytes"] == sum(map(len, TINY.values()))
    assert tiny["revision"] == snapshot.name and tiny["refs"] == ["main"]
    assert tiny["last_accessed"] is not None and tiny["path"] == str(snapshot)
    assert models["configonly"]["status"] == "partial"  # no weight file in it
    assert models["ghost"]["status"] == models["dots-ocr"]["status"] == "missing"
    (other,) = data["other"]
    assert other == {"repo": "someone/unrelated", "type": "model", "size_bytes": 4096,
                     "revisions": 1, "refs": ["main"], "last_accessed": other["last_accessed"]}
    shown = run(tmp_path, "cache")
    assert shown.returncode == 0
    row = next(ln for ln in shown.stdout.splitlines() if "org/tiny" in ln)
    assert "present" in row and "292.99 KiB" in row and snapshot.name[:12] in row
    assert "someone/unrelated" in shown.stdout and "4.00 KiB" in shown.stdout


def test_docker_runtime_pulls_into_the_cache_it_mounts(tmp_path: Path) -> None:
    write_config(tmp_path, kind="docker")
    with hub().serve() as fake:
        pulled = run(tmp_path, "pull", "tiny", "--no-image", endpoint=fake.url)
    assert pulled.returncode == 0, pulled.stderr
    assert (tmp_path / "hf" / "hub" / "models--org--tiny").is_dir()  # runtime.hf_cache/hub
    data = json.loads(run(tmp_path, "cache", "--json").stdout)
    assert data["cache_dir"] == str(tmp_path / "hf" / "hub")
    assert {m["model"]: m["status"] for m in data["models"]}["tiny"] == "present"


def test_a_gated_repo_needs_a_token_which_is_never_printed(tmp_path: Path) -> None:
    write_config(tmp_path)
    with hub().serve() as fake:
        refused = run(tmp_path, "pull", "gated", "--no-image", endpoint=fake.url)
        wrong = run(tmp_path, "pull", "gated", "--no-image", endpoint=fake.url,
                    HF_TOKEN="hf_not_the_right_one")
        allowed = run(tmp_path, "pull", "gated", "--no-image", endpoint=fake.url,
                      HF_TOKEN=SECRET)
    assert refused.returncode == 1
    assert "org/gated is gated: accept its conditions at " + fake.url + "/org/gated" \
        in refused.stderr.replace("\n", " ")
    assert "HF_TOKEN" in refused.stderr and "Traceback" not in refused.stderr
    assert wrong.returncode == 1 and "token in use has no access" in wrong.stderr
    assert "hf_not_the_right_one" not in wrong.stdout + wrong.stderr
    assert allowed.returncode == 0, allowed.stderr
    assert "(with HF_TOKEN)" in allowed.stdout and SECRET not in allowed.stdout + allowed.stderr


def test_offline_unknown_and_bad_names_are_clear_errors(tmp_path: Path) -> None:
    write_config(tmp_path)
    offline = run(tmp_path, "pull", "tiny", "--no-image",
                  endpoint=f"http://127.0.0.1:{closed_port()}")
    assert offline.returncode == 1
    text = offline.stderr.replace("\n", " ")
    assert "cannot reach the Hugging Face Hub at http://127.0.0.1:" in text
    assert "org/tiny is not in the cache at" in text and "Traceback" not in text
    flagged = run(tmp_path, "pull", "tiny", "--no-image", HF_HUB_OFFLINE="1")
    assert flagged.returncode == 1 and "HF_HUB_OFFLINE is set" in flagged.stderr
    with hub().serve() as fake:
        ghost = run(tmp_path, "pull", "ghost", "--no-image", endpoint=fake.url)
    assert ghost.returncode == 1
    assert "org/ghost is not on" in ghost.stderr.replace("\n", " ")
    unknown = run(tmp_path, "pull", "nope")
    assert unknown.returncode == 2 and "no model named 'nope'" in unknown.stderr
    assert "dots-ocr" in unknown.stderr  # what exists
    bad_variant = run(tmp_path, "pull", "dots-ocr:fp4", "--no-weights")
    assert bad_variant.returncode == 2 and "no variant 'fp4'" in bad_variant.stderr


def test_image_pull_without_docker_is_a_clear_error(tmp_path: Path) -> None:
    write_config(tmp_path, kind="docker")
    out = run(tmp_path, "pull", "tiny", "--no-weights",
              DOCKER_HOST=f"unix://{tmp_path}/no-docker.sock")
    assert out.returncode == 1
    assert "Image not pulled:" in out.stderr and "Traceback" not in out.stderr
    assert "no-docker.sock" in out.stderr.replace("\n", "")  # names where it looked


@pytest.mark.docker
def test_image_pull_that_fails_names_the_image_and_the_fix(tmp_path: Path,
                                                          docker_client: Any) -> None:
    """A real Docker engine asked for an image on a registry that does not answer."""
    write_config(tmp_path, kind="docker")
    out = run(tmp_path, "pull", "tiny", "--no-weights",
              DOCKER_HOST=os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock"))
    assert out.returncode == 1, out.stdout
    text = out.stderr.replace("\n", " ")
    assert "Image not pulled: image 127.0.0.1:1/vlmhub/no-such-engine:v1 is not present " \
        "locally and the pull failed" in text
    assert "docker pull 127.0.0.1:1/vlmhub/no-such-engine:v1" in text
