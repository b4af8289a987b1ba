"""The Hugging Face hub: fail fast when it cannot be reached.

:func:`_require_hub` answers within ``HUB_TIMEOUT_S`` seconds, and a hub failure (an offline flag, no
answer, a download that fails) becomes :class:`HubUnreachableError`, whose message names the local
alternatives.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request

HUB_TIMEOUT_S = 5.0


class HubUnreachableError(RuntimeError):
    """The Hugging Face hub cannot be reached (offline mode, no network, or the download failed)."""


def _hub_offline_flag() -> str | None:
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return name
    return None


def _hub_error(what: str, reason: str) -> HubUnreachableError:
    return HubUnreachableError(
        f"{what} needs the Hugging Face hub, which is unreachable ({reason}). Train on local files instead "
        f"(--data-files 'corpus/train/*.txt', optionally --valid-files) or on the offline default (no "
        f"--dataset and no --data-files: the Python standard library's docstrings)")


def _require_hub(what: str) -> None:
    """Raise :class:`HubUnreachableError` in at most ~5 s unless the hub answers a HEAD request."""
    flag = _hub_offline_flag()
    if flag is not None:
        raise _hub_error(what, f"{flag} is set")
    from huggingface_hub import constants

    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=HUB_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return  # it answered, even if with an error status
    except (OSError, ValueError) as error:  # URLError, timeouts, refused connections, a bad endpoint
        raise _hub_error(what, f"no answer from {endpoint} within {HUB_TIMEOUT_S:g} s: {error}") from error


def _load_dataset(path: str, **kwargs):
    """``datasets.load_dataset``; for a hub dataset, any failure becomes :class:`HubUnreachableError`."""
    import datasets

    if path in ("text", "json", "parquet"):
        return datasets.load_dataset(path, **kwargs)
    try:
        return datasets.load_dataset(path, **kwargs)
    except Exception as error:
        raise _hub_error(f"dataset {path!r}", f"loading it failed with {type(error).__name__}: {error}") from error
