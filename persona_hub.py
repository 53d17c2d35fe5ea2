"""Hub ids before a load: one quick look-up, so that an offline or unreachable Hub is one line naming the id at once
(huggingface_hub would retry for about a minute per file), and a cached copy is used as it is."""

from __future__ import annotations

import logging
import os

from persona_errors import CheckpointError

logger = logging.getLogger(__name__)


def hub_options(
    name_or_path: str, revision: str | None, token, trust_remote_code: bool = False, what: str = ""
) -> dict:
    """`from_pretrained` options for a Hub id that fail in one fast line when the Hub cannot be reached.

    huggingface_hub retries an unreachable Hub for about a minute per file: one quick look-up first. A cached copy is
    then used as it is (`local_files_only`), and an id that is neither cached nor reachable is a `CheckpointError`
    naming it (`what` says which model it is, e.g. "NLI model ").
    """
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError
    from transformers import AutoConfig

    if os.path.isdir(os.path.expanduser(name_or_path)):
        return {}
    try:
        AutoConfig.from_pretrained(
            name_or_path, revision=revision, token=token, trust_remote_code=trust_remote_code, local_files_only=True
        )
        cached = True
    except (OSError, ValueError):
        cached = False
    if constants.is_offline_mode():
        if cached:
            return {"local_files_only": True}
        raise CheckpointError(
            f"{what}{name_or_path}: not a local folder and not in the Hub cache, and the Hub is offline "
            "(HF_HUB_OFFLINE=1); download it first or pass a local folder."
        )
    try:
        HfApi().model_info(name_or_path, revision=revision, token=token, timeout=10)
    except HfHubHTTPError as err:  # the Hub answered: no such repository or revision, gated, private, ...
        raise CheckpointError(f"{what}{name_or_path}: {' '.join(str(err).split()[:20])}") from err
    except Exception as err:  # no answer: the HTTP client's connection and timeout errors, whichever client it is
        if cached:
            logger.warning("%s%s: the Hub cannot be reached (%s); using the cached copy.", what, name_or_path, err)
            return {"local_files_only": True}
        raise CheckpointError(
            f"{what}{name_or_path}: the Hub ({constants.ENDPOINT}) cannot be reached ({type(err).__name__}: {err}) "
            "and it is not in the cache; pass a local folder, or download it where the Hub can be reached."
        ) from err
    return {}
