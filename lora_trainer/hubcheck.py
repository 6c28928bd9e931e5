"""Hub ids as model sources: one that is neither in the local Hugging Face cache nor reachable fails
at once, in one line, instead of after minutes of download retries (every loader asks here first)."""

from __future__ import annotations

from .errors import ModelError, first_line


def check_hub_model(repo_id: str, key: str, index_file: str = "model_index.json", timeout: float = 8.0) -> None:
    """A hub id that is neither in the local HF cache nor reachable fails now, in one line, instead
    of after minutes of download retries. A cached model, or a reachable hub, passes."""
    import huggingface_hub
    from huggingface_hub import constants

    try:
        cached = isinstance(huggingface_hub.try_to_load_from_cache(repo_id, index_file), str)
    except ValueError:  # not a valid repo id
        raise ModelError(f"{key}: {repo_id!r} is not a valid hub id (owner/name)") from None
    if cached:
        return
    if constants.HF_HUB_OFFLINE:
        raise ModelError(f"{key}: {repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                         "download it once with network access, or give a local folder")
    try:
        huggingface_hub.HfApi().model_info(repo_id, timeout=timeout, files_metadata=False)
    except huggingface_hub.errors.RepositoryNotFoundError:
        raise ModelError(f"{key}: {repo_id!r} is not on the Hugging Face hub (or is private: run "
                         "`huggingface-cli login`); check the id, or give a local folder") from None
    except huggingface_hub.errors.HfHubHTTPError as exc:
        if getattr(getattr(exc, "response", None), "status_code", 0) in (401, 403):
            raise ModelError(f"{key}: {repo_id!r} needs a Hugging Face login or an accepted licence "
                             "(`huggingface-cli login`, then accept it on its page)") from None
        raise ModelError(f"{key}: cannot reach the Hugging Face hub for {repo_id!r} ({first_line(exc)}); "
                         "connect, or give a local folder") from None
    except Exception as exc:  # noqa: BLE001 -- no network: the HTTP client's own connection/timeout errors
        raise ModelError(f"{key}: {repo_id!r} is not in the local Hugging Face cache and the hub cannot be "
                         f"reached ({type(exc).__name__}); connect once to download it, or give a local folder") from None
