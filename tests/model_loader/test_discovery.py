"""Model discovery: local paths, the hub cache (offline), revisions, and which files are
downloaded per load format. The network is never touched: HF_HUB_OFFLINE=1 is set for every
test, and the tests of the online path replace HfApi and snapshot_download with fakes."""

from __future__ import annotations

import json
import os
from pathlib import Path
from collections.abc import Callable
from typing import Any

import pytest
from huggingface_hub.errors import RepositoryNotFoundError

from pagedllm.model_loader import discovery
from pagedllm.model_loader.discovery import METADATA_PATTERNS, ResolvedModel, hub_allow_patterns, resolve_model, resolve_tokenizer

REVISION = "0123456789abcdef0123456789abcdef01234567"  # conftest.make_hub_cache's default
OTHER_REVISION = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _model_folder(path: Path, weight_files: tuple[str, ...] = ("model.safetensors",)) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    for name in weight_files:
        (path / name).write_bytes(b"")
    return path


def test_local_folder_is_used_as_is(tmp_path: Path) -> None:
    folder = _model_folder(tmp_path / "m")
    assert resolve_model(str(folder), None, None, "auto") == ResolvedModel(str(folder), None)


def test_local_gguf_file_gives_its_folder_and_the_file(tmp_path: Path) -> None:
    gguf = tmp_path / "tiny.Q4_0.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model(str(gguf), None, None, "auto") == ResolvedModel(str(tmp_path), str(gguf))


def test_missing_local_gguf_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such .gguf file"):
        resolve_model(str(tmp_path / "absent.gguf"), None, None, "auto")


def test_path_that_is_neither_local_nor_a_hub_id_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="neither an existing local folder"):
        resolve_model(str(tmp_path / "no" / "such" / "folder"), None, None, "auto")


def test_hub_id_resolves_offline_from_the_cache(tmp_path: Path, make_cache: Callable[..., Path]) -> None:
    snapshot = make_cache(tmp_path / "cache", "org/name", _model_folder(tmp_path / "src"))
    resolved = resolve_model("org/name", None, str(tmp_path / "cache"), "auto")
    assert resolved == ResolvedModel(str(snapshot), None)


def test_revision_commit_hash_picks_that_snapshot(tmp_path: Path, make_cache: Callable[..., Path]) -> None:
    cache = tmp_path / "cache"
    main = make_cache(cache, "org/name", _model_folder(tmp_path / "a"), revision=REVISION)
    older = make_cache(cache, "org/name", _model_folder(tmp_path / "b"), revision=OTHER_REVISION, ref=None)
    assert resolve_model("org/name", None, str(cache), "auto").model_path == str(main)
    assert resolve_model("org/name", "main", str(cache), "auto").model_path == str(main)
    assert resolve_model("org/name", OTHER_REVISION, str(cache), "auto").model_path == str(older)


def test_model_missing_offline_names_model_cache_and_offline_mode(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    with pytest.raises(ValueError) as excinfo:
        resolve_model("org/absent", None, str(cache), "auto")
    message = str(excinfo.value)
    assert "'org/absent'" in message
    assert str(cache / "models--org--absent") in message
    assert "HF_HUB_OFFLINE=1 forbids downloading" in message
    assert "local folder" in message


def test_unknown_revision_offline_is_a_clear_error(tmp_path: Path, make_cache: Callable[..., Path]) -> None:
    make_cache(tmp_path / "cache", "org/name", _model_folder(tmp_path / "src"))
    with pytest.raises(ValueError, match="revision v2.*HF_HUB_OFFLINE=1"):
        resolve_model("org/name", "v2", str(tmp_path / "cache"), "auto")


def test_cached_snapshot_without_the_requested_format_offline_is_a_clear_error(tmp_path: Path, make_cache: Callable[..., Path]) -> None:
    make_cache(tmp_path / "cache", "org/name", _model_folder(tmp_path / "src"))
    with pytest.raises(ValueError, match="load_format='pt'.*model.safetensors.*HF_HUB_OFFLINE=1"):
        resolve_model("org/name", None, str(tmp_path / "cache"), "pt")


def test_dummy_format_needs_no_weights_in_the_cache(tmp_path: Path, make_cache: Callable[..., Path]) -> None:
    snapshot = make_cache(tmp_path / "cache", "org/name", _model_folder(tmp_path / "src", weight_files=()))
    assert resolve_model("org/name", None, str(tmp_path / "cache"), "dummy").model_path == str(snapshot)


def test_tokenizer_resolves_locally_and_from_the_cache(tmp_path: Path, make_cache: Callable[..., Path]) -> None:
    snapshot = make_cache(tmp_path / "cache", "org/tok", _model_folder(tmp_path / "src", weight_files=()))
    assert resolve_tokenizer("org/tok", None, str(tmp_path / "cache")) == str(snapshot)
    assert resolve_tokenizer(str(tmp_path / "src"), None, None) == str(tmp_path / "src")
    with pytest.raises(ValueError, match="'org/none'.*HF_HUB_OFFLINE=1"):
        resolve_tokenizer("org/none", None, str(tmp_path / "cache"))


# --- which files are downloaded -------------------------------------------------------------

REPO_BOTH = [
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
    "model.safetensors.index.json", "consolidated.safetensors",
    "pytorch_model.bin", "training_args.bin", "original/consolidated.00.pth", "README.md",
]


def test_auto_prefers_safetensors_and_fetches_no_bin() -> None:
    patterns = hub_allow_patterns(REPO_BOTH, "auto")
    assert patterns[: len(METADATA_PATTERNS)] == list(METADATA_PATTERNS)
    # Before the index is read, Mistral's consolidated copy is skipped by its name.
    assert patterns[len(METADATA_PATTERNS):] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]


def test_index_decides_the_safetensors_shards() -> None:
    patterns = hub_allow_patterns(REPO_BOTH, "safetensors", indexed=["model-00002-of-00002.safetensors", "model-00001-of-00002.safetensors"])
    assert patterns[len(METADATA_PATTERNS):] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]


def test_pt_fetches_only_bin_weights_not_trainer_pickles() -> None:
    assert hub_allow_patterns(REPO_BOTH, "pt")[len(METADATA_PATTERNS):] == ["pytorch_model.bin"]


def test_auto_falls_back_to_bin_when_there_is_no_safetensors() -> None:
    files = ["config.json", "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin", "training_args.bin"]
    assert hub_allow_patterns(files, "auto")[len(METADATA_PATTERNS):] == files[1:3]


def test_dummy_fetches_metadata_only() -> None:
    assert hub_allow_patterns(REPO_BOTH, "dummy") == list(METADATA_PATTERNS)


def test_repo_without_the_requested_format_lists_what_it_has() -> None:
    with pytest.raises(ValueError, match="load_format='safetensors'.*pytorch_model.bin.*Use load_format='pt'"):
        hub_allow_patterns(["config.json", "pytorch_model.bin"], "safetensors")


class _FakeHub:
    """Stands in for the Hub: a file list, and a snapshot_download that copies the matching
    files of `source` into a hub-style cache and records each call."""

    def __init__(self, source: Path, cache: Path, repo_files: list[str]) -> None:
        self.source, self.cache, self.repo_files = source, cache, repo_files
        self.calls: list[dict[str, Any]] = []

    def list_repo_files(self, repo_id: str, revision: str | None = None) -> list[str]:
        return self.repo_files

    def snapshot_download(self, repo_id: str, **kwargs: Any) -> str:
        import fnmatch
        import shutil

        self.calls.append(kwargs)
        snapshot = Path(kwargs["cache_dir"]) / "models--org--name" / "snapshots" / REVISION
        snapshot.mkdir(parents=True, exist_ok=True)
        for name in os.listdir(self.source):
            if any(fnmatch.fnmatch(name, p) for p in kwargs["allow_patterns"]):
                shutil.copy(self.source / name, snapshot / name)
        return str(snapshot)


def _use_fake_hub(monkeypatch: pytest.MonkeyPatch, hub: _FakeHub) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(discovery, "HfApi", lambda: hub)
    monkeypatch.setattr(discovery, "snapshot_download", hub.snapshot_download)


def test_online_download_fetches_metadata_then_only_the_indexed_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = _model_folder(tmp_path / "src", weight_files=("model-00001-of-00001.safetensors", "consolidated.safetensors", "pytorch_model.bin"))
    (source / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001-of-00001.safetensors"}}))
    hub = _FakeHub(source, tmp_path / "cache", sorted(os.listdir(source)))
    _use_fake_hub(monkeypatch, hub)
    resolved = resolve_model("org/name", "main", str(tmp_path / "cache"), "auto")
    assert sorted(os.listdir(resolved.model_path)) == ["config.json", "model-00001-of-00001.safetensors", "model.safetensors.index.json"]
    assert [call["revision"] for call in hub.calls] == ["main", REVISION]  # the second is pinned
    assert all(call["local_files_only"] is False for call in hub.calls)
    assert hub.calls[1]["allow_patterns"] == [*METADATA_PATTERNS, "model-00001-of-00001.safetensors"]


def test_online_dummy_downloads_no_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = _model_folder(tmp_path / "src", weight_files=("model.safetensors",))
    hub = _FakeHub(source, tmp_path / "cache", sorted(os.listdir(source)))
    _use_fake_hub(monkeypatch, hub)
    resolved = resolve_model("org/name", None, str(tmp_path / "cache"), "dummy")
    assert os.listdir(resolved.model_path) == ["config.json"]
    assert hub.calls[0]["allow_patterns"] == list(METADATA_PATTERNS)


def test_repo_not_on_the_hub_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class NoSuchRepo:
        def list_repo_files(self, repo_id: str, revision: str | None = None) -> list[str]:
            error = RepositoryNotFoundError.__new__(RepositoryNotFoundError)
            Exception.__init__(error, "404 Repository Not Found")
            raise error

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(discovery, "HfApi", NoSuchRepo)
    with pytest.raises(ValueError, match="'org/typo' is not a local path and not a repo on the Hugging Face Hub"):
        resolve_model("org/typo", None, str(tmp_path), "auto")


def test_no_network_falls_back_to_the_cache_then_explains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_cache: Callable[..., Path]) -> None:
    class Unreachable:
        def list_repo_files(self, repo_id: str, revision: str | None = None) -> list[str]:
            raise ConnectionError("Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(discovery, "HfApi", Unreachable)
    snapshot = make_cache(tmp_path / "cache", "org/name", _model_folder(tmp_path / "src"))
    assert resolve_model("org/name", None, str(tmp_path / "cache"), "auto").model_path == str(snapshot)
    with pytest.raises(ValueError, match="'org/other'.*the Hub could not be reached .ConnectionError"):
        resolve_model("org/other", None, str(tmp_path / "cache"), "auto")


def test_offline_snapshot_missing_unneeded_files_is_used_as_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub >= 2 calls a cached snapshot incomplete when files an earlier filtered
    download skipped are absent; offline, the snapshot is still used."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    snapshot = _model_folder(tmp_path / "snapshot")

    def incomplete(repo_id: str, **kwargs: Any) -> str:
        error = LocalEntryNotFoundError("1 file(s) are missing (LICENSE.txt)")
        error.snapshot_path = str(snapshot)  # type: ignore[attr-defined]
        raise error

    monkeypatch.setattr(discovery, "snapshot_download", incomplete)
    assert resolve_tokenizer("org/name", None, str(tmp_path)) == str(snapshot)
    assert resolve_model("org/name", None, str(tmp_path), "auto").model_path == str(snapshot)
