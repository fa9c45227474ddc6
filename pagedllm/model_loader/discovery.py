"""Model discovery: turn what the user passed as `model=` into a local folder (or .gguf file).

A local folder or .gguf file is used as is. Anything else is a Hugging Face hub id, resolved
through the hub cache with `huggingface_hub.snapshot_download`, fetching the config and
tokenizer files plus the files of the one weight format that will be loaded (a repo with both
safetensors and .bin files costs one copy, not two; load_format='dummy' fetches no weights).
With HF_HUB_OFFLINE=1 only the cache is read.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Collection
from dataclasses import dataclass

from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from pagedllm import envs
from pagedllm.model_loader.weight_utils import (
    choose_weight_format,
    find_weight_files,
    index_file_name,
    read_index,
    select_weight_files,
)

logger = logging.getLogger(__name__)

# Config, generation config, tokenizer (tokenizer.json, sentencepiece .model, tiktoken,
# vocab/merges .txt), chat templates, shard indexes, processor configs, and remote code
# (only run when trust_remote_code=True). All small.
METADATA_PATTERNS = ("*.json", "*.model", "*.tiktoken", "*.txt", "*.jinja", "*.py")
# The load formats whose files choose_weight_format picks.
_CHECKPOINT_FORMATS = ("auto", "safetensors", "pt")
# "name" or "org/name", the hub's own character set.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


@dataclass(frozen=True)
class ResolvedModel:
    model_path: str
    """Local folder holding config.json, tokenizer files and weights (for GGUF: the file's
    folder)."""
    gguf_file: str | None
    """The .gguf file when the model is one, else None."""


def resolve_model(
    model: str, revision: str | None, download_dir: str | None, load_format: str
) -> ResolvedModel:
    """The local files of `model` (a folder, a .gguf file or a hub id), downloading from the
    hub what `load_format` needs unless HF_HUB_OFFLINE=1. Errors are ValueErrors saying what
    to do."""
    local = _local_path(model, "model")
    if local is not None:
        if os.path.isdir(local):
            logger.debug("Model %s: local folder %s.", model, local)
            return ResolvedModel(model_path=local, gguf_file=None)
        if local.endswith(".gguf"):
            logger.debug("Model %s: local GGUF file %s.", model, local)
            return ResolvedModel(model_path=os.path.dirname(local), gguf_file=local)
        raise ValueError(
            f"model={model!r} is a file but not a .gguf file; pass the folder that holds "
            "config.json and the weights, or a .gguf file."
        )
    repo_id = _check_hub_id(model, "model")
    if load_format == "gguf":
        raise ValueError(f"load_format='gguf' needs model= to be a local .gguf file, got hub id {model!r}.")
    folder = _snapshot_for_weights(repo_id, revision, download_dir, load_format)
    logger.info("Model %s (revision %s): %s.", repo_id, revision or "main", folder)
    return ResolvedModel(model_path=folder, gguf_file=None)


def resolve_tokenizer(tokenizer: str, revision: str | None, download_dir: str | None) -> str:
    """The local folder (or .gguf file) of `tokenizer`, downloading only tokenizer and config
    files for a hub id."""
    local = _local_path(tokenizer, "tokenizer")
    if local is not None:
        logger.debug("Tokenizer %s: local %s.", tokenizer, local)
        return local
    repo_id = _check_hub_id(tokenizer, "tokenizer")
    offline = envs.hf_hub_offline()
    folder = _snapshot(repo_id, revision, download_dir, list(METADATA_PATTERNS), offline, option="tokenizer")
    logger.info("Tokenizer %s (revision %s): %s.", repo_id, revision or "main", folder)
    return folder


def hub_allow_patterns(
    repo_files: Collection[str], load_format: str, indexed: Collection[str] | None = None
) -> list[str]:
    """What to download of a repo holding `repo_files`: the metadata patterns plus the exact
    weight files of the one format `load_format` reads (none for 'dummy'). `indexed` is the
    shard list of the format's index file once it is known; it excludes unlisted duplicates."""
    if load_format == "dummy":
        return list(METADATA_PATTERNS)
    if load_format == "sharded_state":  # per-rank files, named by the saver
        return [*METADATA_PATTERNS, "*.safetensors"]
    weight_format = choose_weight_format(repo_files, load_format, "the hub repo")
    return [*METADATA_PATTERNS, *select_weight_files(repo_files, weight_format, indexed)]


def _local_path(name: str, option: str) -> str | None:
    path = os.path.abspath(os.path.expanduser(name))
    if os.path.exists(path):
        return path
    if name.endswith(".gguf"):
        raise ValueError(f"{option}={name!r}: no such .gguf file ({path}); pass an existing file.")
    return None


def _check_hub_id(name: str, option: str) -> str:
    if not _HUB_ID.fullmatch(name) or ".." in name:
        raise ValueError(
            f"{option}={name!r} is neither an existing local folder or .gguf file nor a hub id "
            "like 'org/name'; check the path."
        )
    return name


def _cache_dir(download_dir: str | None) -> str:
    """download_dir, else the hub cache as the environment names it now (huggingface_hub fixes
    its constant at import; a variable set later, as a test's monkeypatch does, still counts,
    as HF_HUB_OFFLINE does)."""
    if download_dir:
        return os.path.abspath(os.path.expanduser(download_dir))
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return os.path.expanduser(os.environ[variable])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return constants.HF_HUB_CACHE


def _snapshot_for_weights(
    repo_id: str, revision: str | None, download_dir: str | None, load_format: str
) -> str:
    if envs.hf_hub_offline():
        return _cached_snapshot(repo_id, revision, download_dir, load_format, reason=None)
    try:
        repo_files = HfApi().list_repo_files(repo_id, revision=revision)
    except (RepositoryNotFoundError, RevisionNotFoundError) as error:
        raise _hub_error(repo_id, revision, error) from None
    except Exception as error:  # no network, Hub down, huggingface_hub offline since import
        logger.warning("Cannot list %s on the Hub (%s); looking in the cache.", repo_id, _short(error))
        return _cached_snapshot(repo_id, revision, download_dir, load_format, reason=error)
    if load_format not in _CHECKPOINT_FORMATS:
        patterns = hub_allow_patterns(repo_files, load_format)
        return _snapshot(repo_id, revision, download_dir, patterns, offline=False)
    # Fail before downloading anything when the repo lacks the requested format.
    weight_format = choose_weight_format(repo_files, load_format, f"hub repo {repo_id}")
    folder = _snapshot(repo_id, revision, download_dir, list(METADATA_PATTERNS), offline=False)
    # The metadata brought the shard index: download the shards it names, not every file of
    # the format (Mistral repos also hold a consolidated copy).
    index_path = os.path.join(folder, index_file_name(weight_format))
    indexed = read_index(index_path) if os.path.isfile(index_path) else None
    patterns = hub_allow_patterns(repo_files, load_format, indexed)
    commit = os.path.basename(folder)  # pin the commit the metadata came from
    return _snapshot(repo_id, commit, download_dir, patterns, offline=False)


def _cached_snapshot(
    repo_id: str, revision: str | None, download_dir: str | None, load_format: str, reason: Exception | None
) -> str:
    # Ask only for config.json to find the snapshot; the weights are checked here, with an
    # error that names the load format.
    folder = _snapshot(repo_id, revision, download_dir, ["config.json"], offline=True, reason=reason)
    if load_format in _CHECKPOINT_FORMATS:
        try:
            find_weight_files(folder, load_format)
        except ValueError as error:
            raise ValueError(
                f"{error} Only the cached files of {repo_id!r} can be used, since "
                f"{_offline_why(reason)}: run once online with this load_format, or pass a local "
                "folder as model=."
            ) from None
    return folder


def _snapshot(
    repo_id: str,
    revision: str | None,
    download_dir: str | None,
    allow_patterns: list[str],
    offline: bool,
    reason: Exception | None = None,
    option: str = "model",
) -> str:
    try:
        return snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=_cache_dir(download_dir),
            allow_patterns=allow_patterns,
            local_files_only=offline,
        )
    except LocalEntryNotFoundError as error:
        snapshot_path = getattr(error, "snapshot_path", None)
        if offline and snapshot_path and os.path.isdir(snapshot_path):
            # huggingface_hub >= 2 compares the cache with the repo's cached file list; files an
            # earlier, differently filtered download skipped (a LICENSE.txt) need not matter:
            # the loaders name any file that is really missing.
            logger.warning("The cached snapshot of %s lacks some files (%s); using it as is.", repo_id, error)
            return str(snapshot_path)
        cache = os.path.join(_cache_dir(download_dir), "models--" + repo_id.replace("/", "--"))
        raise ValueError(
            f"{option}={repo_id!r} (revision {revision or 'main'}) is not in the hub cache (searched "
            f"{cache}) and {_offline_why(reason)}. Run once online to download it, pass "
            f"download_dir= pointing at the cache that has it, or pass a local folder as {option}=."
        ) from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as error:
        raise _hub_error(repo_id, revision, error, option) from None
    except Exception as error:  # network errors mid-download come from several HTTP libraries
        raise ValueError(
            f"Downloading {option}={repo_id!r} (revision {revision or 'main'}) failed: {_short(error)}. "
            f"Check the network and try again, or pass a local folder as {option}=."
        ) from None


def _offline_why(reason: Exception | None) -> str:
    if reason is None:
        return "HF_HUB_OFFLINE=1 forbids downloading"
    return f"the Hub could not be reached ({_short(reason)})"


def _hub_error(repo_id: str, revision: str | None, error: Exception, option: str = "model") -> ValueError:
    if isinstance(error, GatedRepoError):
        return ValueError(
            f"{option}={repo_id!r} is gated on the Hub: accept its terms on huggingface.co and log in "
            f"(`hf auth login` or HF_TOKEN), or pass a local folder as {option}=."
        )
    if isinstance(error, RevisionNotFoundError):
        return ValueError(
            f"revision={revision!r} does not exist for {option}={repo_id!r}; pass an existing branch, "
            "tag or commit hash (or revision=None for main)."
        )
    return ValueError(
        f"{option}={repo_id!r} is not a local path and not a repo on the Hugging Face Hub (or it is "
        "private: log in with `hf auth login` or set HF_TOKEN). Check the name or pass a local "
        f"folder as {option}=."
    )


def _short(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"
