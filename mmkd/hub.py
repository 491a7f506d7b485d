"""Push a trained student folder to the Hugging Face Hub as a repository that loads without mmkd.

A student folder written by ``recipes/clip_student.py`` holds more than the model: Trainer checkpoints with
optimizer states, TensorBoard logs, a pickled ``training_args.bin``. The repository gets only what makes a stock
``transformers`` model plus its documentation (:data:`PUSH_PATTERNS`): the safetensors weights, ``config.json``,
the processor and tokenizer files, the model card (``README.md``, written from :mod:`mmkd.reporting.cards` when missing)
and the run's JSON records (``training_config.json``, ``training_summary.json``, ``eval_results.json`` /
``results.json``, ...). ::

    python -m mmkd.push out/vit-b32-half --repo-id me/clip-vit-b32-half           # or: mmkd push ...
    python -m mmkd.push out/vit-b32-half --repo-id me/clip-vit-b32-half --dry-run  # list, send nothing

Pushing deletes nothing in the local folder and writes only the card (a missing ``README.md``, or an mmkd card's
usage snippet pointed at the repository), once the repository exists; and every failure (no network,
``HF_HUB_OFFLINE``, a refused token, an HTTP error) ends as one :class:`PushError` line that names the
repository and the endpoint and says the local folder is intact, so a re-run after the fix pushes the same files.

The upload is ``huggingface_hub``'s own (``HfApi.create_repo`` + ``HfApi.upload_folder``), so ``HF_ENDPOINT``,
``HF_TOKEN`` and Xet storage (when ``hf_xet`` is installed) work as for any Hub upload; so is the file selection
(``allow_patterns`` / ``ignore_patterns``, which :func:`files_to_push` applies with the same
``huggingface_hub.utils.filter_repo_objects``, so what a dry run lists is what ``upload_folder`` sends).
"""

from __future__ import annotations

import glob
import json
import os
import re
import tempfile
from pathlib import Path

# The files of a complete student repository: huggingface_hub's allow_patterns, matched with fnmatch against each
# path relative to the folder. Its ``*`` crosses ``/``, so what keeps them to top-level files is
# :func:`push_patterns`, which ignores every sub-folder but runs/ (with include_runs).
PUSH_PATTERNS: list[str] = [
    # weights, one file or shards with their index (never pickled *.bin: safetensors load without running code)
    "*.safetensors",
    "*.safetensors.index.json",
    # model, processor and tokenizer configuration
    "config.json",
    "generation_config.json",
    "processor_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "*.model",
    # the model card and the images it shows
    "README.md",
    "*.md",
    "*.png",
    "*.jpg",
    "*.jpeg",
    "*.svg",
    "*.gif",
    # the run's records: training_config.json, training_summary.json, trainer_state.json, eval_results.json,
    # results.json, ...
    "*.json",
]

# TensorBoard event files: the Hub shows them as the repository's "Training metrics"; opt-in (``include_runs``).
RUNS_PATTERNS: list[str] = ["runs/*"]

# An ONNX export written into the student folder (``mmkd export --format onnx DIR DIR/onnx``): its encoders (and
# external weight files, which torch writes beside a graph over 2 GB), its processor files (``*.json`` above and
# the tokenizer's ``merges.txt``) and its metadata, which the card's int8 section reads. Pushed when ``onnx/``
# is an mmkd export (:func:`mmkd.interop.formats.onnx_folder`).
ONNX_PATTERNS: list[str] = ["onnx/*.onnx", "onnx/*.onnx.data", "onnx/*.txt"]

# Never pushed, wherever they are: hidden and private (``_*``) files and folders, pickles (training_args.bin,
# optimizer states: loading them runs code) and recipes/offline_job.py's stage record, which means nothing on the Hub.
IGNORE_PATTERNS: list[str] = [
    ".*", "*/.*", "_*", "*/_*", "*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "mmkd_job_stage.json",
]  # fmt: skip

DEFAULT_COMMIT_MESSAGE = "Upload mmkd student"

# The reproduce line of a card written here: training_config.json (pushed with the model) is a valid --config.
DEFAULT_COMMAND = (
    "accelerate launch recipes/clip_student.py --config training_config.json  "
    "# training_config.json is in this repository"
)

MATCH_COMMAND = (
    "accelerate launch recipes/match_student.py --config training_config.json --stage distill  "
    "# training_config.json is in this repository; the teacher stage must have run in the same --output_dir"
)

# The usage snippets of model_cards/*.md, whose model="..." / from_pretrained("...") must name the repository.
_USAGE_SNIPPET = re.compile(
    r'(pipeline\(\s*"zero-shot-image-classification"\s*,\s*model="|\.from_pretrained\(")([^"]*)(")'
)


class PushError(RuntimeError):
    """A push that did not reach the Hub: one line naming what failed, the repository and the endpoint.

    Raised only for the Hub calls. The push deletes nothing in the folder; its one write, the model card
    (:func:`ensure_model_card`), happens only once the repository exists. So the message can promise that the
    local folder is intact, and pushing it again later sends the same files.
    """

    def __init__(self, message: str, *, repo_id: str, endpoint: str, folder: Path):
        super().__init__(message)
        self.repo_id = repo_id
        self.endpoint = endpoint
        self.folder = folder


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def push_patterns(folder: str | Path, include_runs: bool = False) -> tuple[list[str], list[str]]:
    """``(allow_patterns, ignore_patterns)`` of a push of ``folder``, for ``HfApi.upload_folder`` and
    ``filter_repo_objects``: :data:`PUSH_PATTERNS` (+ :data:`RUNS_PATTERNS` with ``include_runs``), and
    :data:`IGNORE_PATTERNS` plus ``<name>/*`` for each of the folder's sub-folders (checkpoint-*/, a sweep's
    runs, ...) but ``runs/`` with ``include_runs`` and ``onnx/`` when it holds an mmkd ONNX export
    (:data:`ONNX_PATTERNS`): huggingface_hub's ``*`` crosses ``/``, so ``*.json`` alone would take a checkpoint's
    ``trainer_state.json`` too."""
    from mmkd.interop.formats import ONNX_SUBFOLDER, onnx_folder

    onnx = onnx_folder(folder) is not None
    keep = ({"runs"} if include_runs else set()) | ({ONNX_SUBFOLDER} if onnx else set())
    subfolders = sorted(p.name for p in Path(folder).iterdir() if p.is_dir() and p.name not in keep)
    allow = PUSH_PATTERNS + (RUNS_PATTERNS if include_runs else []) + (ONNX_PATTERNS if onnx else [])
    return allow, IGNORE_PATTERNS + [glob.escape(name) + "/*" for name in subfolders]


def _missing_essentials(folder: Path, names: set[str]) -> list[str]:
    """What a loadable repository needs and ``folder`` lacks (``names``: its top-level file names)."""
    missing = []
    config: dict = {}
    if "config.json" not in names:
        missing.append("config.json")
    else:
        try:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            missing.append("a readable config.json")
    index = "model.safetensors.index.json"
    if index in names:
        try:
            shards = set(json.loads((folder / index).read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError):
            missing.append(f"a readable {index}")
        else:
            missing.extend(sorted(shards - names))
    elif not any(n.endswith(".safetensors") for n in names):
        missing.append("a *.safetensors weights file")
    if config.get("model_type") == "clip":  # pipeline("zero-shot-image-classification") needs both halves
        if not names & {"processor_config.json", "preprocessor_config.json"}:
            missing.append("the image processor (processor_config.json or preprocessor_config.json)")
        if not names & {"tokenizer.json", "tokenizer_config.json"}:
            missing.append("the tokenizer (tokenizer.json or tokenizer_config.json)")
    from mmkd.interop.formats import onnx_folder
    from mmkd.interop.to_onnx import IMAGE_FILE, TEXT_FILE

    onnx = onnx_folder(folder)
    if onnx is not None:  # pushed with the model: it must be a loadable export too
        missing.extend(f"onnx/{f}" for f in (IMAGE_FILE, TEXT_FILE) if not (onnx / f).is_file())
        if not any((onnx / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            missing.append("the tokenizer of onnx/ (onnx/tokenizer.json or onnx/tokenizer_config.json)")
    if config.get("model_type") == "mmkd_resnet_minilm" and not names & {"tokenizer.json", "tokenizer_config.json"}:
        missing.append("the MiniLM tokenizer (tokenizer.json or tokenizer_config.json)")  # a match student
    return missing


def files_to_push(folder: str | Path, include_runs: bool = False) -> list[Path]:
    """The files a push of ``folder`` uploads, as sorted paths relative to it (= their paths in the repository).

    Weights, configuration, processor and tokenizer files, the card and the run's JSON records, selected from the
    folder's files by huggingface_hub's ``filter_repo_objects`` with :func:`push_patterns`, as ``upload_folder``
    selects them; never ``checkpoint-*/``, optimizer or scheduler states, ``training_args.bin`` or hidden files,
    and ``runs/`` (TensorBoard) only with ``include_runs``. Raises ``FileNotFoundError`` naming
    what a loadable model lacks (``config.json``, a ``*.safetensors`` file, the shards of an index and, for a
    CLIP model, its processor and tokenizer files) so an incomplete folder fails before any network call.
    """
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: pass the output_dir of a training run")
    allow, ignore = push_patterns(folder, include_runs)
    # listed as upload_folder lists it: every file below the folder, then its patterns and its .git/ exclusions
    files = [p.relative_to(folder).as_posix() for p in sorted(folder.glob("**/*")) if p.is_file()]
    found = [Path(f) for f in filter_repo_objects(files, allow_patterns=allow,
                                                  ignore_patterns=ignore + DEFAULT_IGNORE_PATTERNS)]
    missing = _missing_essentials(folder, {p.name for p in found if len(p.parts) == 1})
    if missing:
        raise FileNotFoundError(f"{folder} is not a complete model folder: missing {', '.join(missing)}")
    return sorted(found, key=lambda p: p.as_posix())


def _write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` in one step, so an interrupted write never leaves a half-written card."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".README.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _is_mmkd_card(path: Path) -> bool:
    from huggingface_hub.repocard import metadata_load

    try:
        metadata = metadata_load(path) or {}
    except Exception:  # a card whose YAML does not parse is not one mmkd wrote
        return False
    return "mmkd" in (metadata.get("tags") or [])


def ensure_model_card(folder: str | Path, repo_id: str, command: str | None = None) -> Path:
    """Make ``folder/README.md`` a card whose usage snippet loads the model from ``repo_id``; returns its path.

    * No ``README.md``: render ``model_cards/clip_student.md`` from a CLIP student folder's ``config.json``,
      ``training_summary.json`` and ``training_config.json`` (:func:`mmkd.reporting.cards.clip_student_card_data`), or
      ``model_cards/match_student.md`` from a match student's ``config.json``, weights, ``eval_results.json``
      and ``training_config.json`` (:func:`mmkd.reporting.cards.match_student_card_data`); ``command`` is its reproduce
      line (default: the recipe with the pushed ``training_config.json``). A CLIP card written here has no
      evaluation table and a match card only this model's row: render one with all results through
      :mod:`mmkd.reporting.cards` first, as ``recipes/offline_job.py`` and ``recipes/match_student.py`` do. A folder that
      is neither raises ``FileNotFoundError``.
    * A card mmkd rendered (tag ``mmkd``) for another name (the recipes write the local path): only the
      ``model="..."`` of its ``pipeline(...)`` snippet and the ids of its ``from_pretrained("...")`` calls change,
      and its "Formats" section is rendered afresh from the folder (:mod:`mmkd.interop.formats`: exports written
      after the card appear, with the int8 export's measured size, speed and accuracy); results, bias and
      limitations stay as written.
    * Any other card is left exactly as it is.
    """
    folder = Path(folder)
    path = folder / "README.md"
    if path.is_file():
        if _is_mmkd_card(path):
            from mmkd.interop.formats import update_formats_section

            text = path.read_text(encoding="utf-8")
            updated = _USAGE_SNIPPET.sub(lambda m: m.group(1) + repo_id + m.group(3), text)
            updated = update_formats_section(updated, folder, repo_id)
            if updated != text:
                _write_atomically(path, updated)
        return path
    try:
        card = _render_card(folder, repo_id, command)
    except (OSError, ValueError, KeyError) as err:
        raise FileNotFoundError(
            f"{folder} has no README.md and mmkd cannot write one ({_one_line(err)}): add a model card first"
        ) from None
    _write_atomically(path, card)
    return path


def _render_card(folder: Path, repo_id: str | None, command: str | None) -> str:
    """The card of an mmkd student folder from its own records: a match student (``config.json`` model_type
    ``mmkd_resnet_minilm``, from ``recipes/match_student.py``) or a CLIP student (``recipes/clip_student.py``)."""
    from mmkd.reporting import cards

    try:
        model_type = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        model_type = None
    if model_type == "mmkd_resnet_minilm":
        data = cards.match_student_card_data(folder, command=command or MATCH_COMMAND, repo_id=repo_id)
        return str(cards.render_match_student_card(data))
    data = cards.clip_student_card_data(folder, command=command or DEFAULT_COMMAND, repo_id=repo_id)
    return str(cards.render_clip_student_card(data))


def _describe_failure(err: BaseException) -> str:
    """One line for a failed Hub call: the HTTP status and the server's message, or the network error."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    # huggingface_hub wraps some failures (an LFS upload: RuntimeError "Error while uploading ..."): the root
    # cause says more.
    root = err
    while isinstance(root, RuntimeError) and root.__cause__ is not None:
        root = root.__cause__
    if isinstance(root, OfflineModeIsEnabled):
        return "offline mode is enabled (HF_HUB_OFFLINE=1): unset it to push"
    if isinstance(root, HfHubHTTPError) and root.response is not None:
        status = root.response.status_code
        server = root.server_message or ""
        try:
            request = root.response.request
            what = f"HTTP {status} from {request.method} {request.url.path}"
        except RuntimeError:  # a response built without its request
            what = f"HTTP {status}"
        hint = " (check the token: --token, --hub_token, HF_TOKEN or `hf auth login`)" if status in (401, 403) else ""
        return _one_line(f"{what}: {server}{hint}" if server else f"{what}{hint}")
    return _one_line(f"{type(root).__name__}: {root}") if str(root) else type(root).__name__


def push_folder(
    folder: str | Path,
    repo_id: str,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    revision: str | None = None,
    endpoint: str | None = None,
    include_runs: bool = False,
    model_card: bool = True,
    command: str | None = None,
) -> str:
    """Create ``repo_id`` on the Hub (if needed) and upload :func:`files_to_push` of ``folder`` in one commit;
    returns the commit URL.

    ``repo_id`` without a namespace goes to the token's user, as ``Trainer`` does; ``private`` only applies to a
    new repository; ``revision`` is a branch, created from ``main`` when missing; ``endpoint`` defaults to
    ``HF_ENDPOINT``. With ``model_card`` the card is ensured (:func:`ensure_model_card`, ``command`` its
    reproduce line) once the repository exists, with the full id the Hub gave it. Problems of the folder raise
    ``FileNotFoundError`` / ``ValueError`` before any network call; every failure of the Hub calls raises
    :class:`PushError` (one line). Nothing in the folder is deleted; the card is the only file written.
    """
    from huggingface_hub import HfApi, constants
    from huggingface_hub.utils import validate_repo_id

    folder = Path(folder)
    try:
        validate_repo_id(repo_id)
    except ValueError as err:
        raise ValueError(f"invalid repository id {repo_id!r}: {_one_line(err)}") from None
    files_to_push(folder, include_runs=include_runs)  # an incomplete folder fails here, before the network
    if model_card and not (folder / "README.md").is_file():
        try:  # a card that cannot be written fails here too, not after the repository was created
            _render_card(folder, None, command)
        except (OSError, ValueError, KeyError) as err:
            raise FileNotFoundError(
                f"{folder} has no README.md and mmkd cannot write one ({_one_line(err)}): add a model card first"
            ) from None

    api = HfApi(endpoint=endpoint, token=token or None)
    target = repo_id

    def fail(what: str, err: BaseException) -> PushError:
        return PushError(
            f"push to {target} at {api.endpoint} failed while {what}: {_describe_failure(err)}; "
            f"the local folder {folder} is intact",
            repo_id=target, endpoint=api.endpoint, folder=folder,
        )

    if constants.is_offline_mode():
        raise PushError(
            f"push to {repo_id} at {api.endpoint} not attempted: offline mode is enabled (HF_HUB_OFFLINE=1), "
            f"unset it to push; the local folder {folder} is intact",
            repo_id=repo_id, endpoint=api.endpoint, folder=folder,
        )
    network_errors = _network_errors()
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        target = repo_url.repo_id or repo_id
        if revision is not None and revision != constants.DEFAULT_REVISION:
            api.create_branch(target, branch=revision, exist_ok=True, repo_type="model")
    except network_errors as err:
        raise fail("creating the repository", err) from err
    if model_card:
        ensure_model_card(folder, target, command=command)
    files = files_to_push(folder, include_runs=include_runs)
    allow, ignore = push_patterns(folder, include_runs)  # what files_to_push applied: the same selection
    try:
        info = api.upload_folder(
            repo_id=target,
            folder_path=folder,
            repo_type="model",
            revision=revision,
            commit_message=commit_message,
            allow_patterns=allow,
            ignore_patterns=ignore,
        )
    except network_errors as err:
        raise fail(f"uploading {len(files)} files", err) from err
    return str(info.commit_url)


def push_trained(folder: str | Path, repo_id: str, args, command: str) -> str:
    """The recipes' one push at the end of training, from the main process, with the ``hub_*`` options of ``args``
    (their ``TrainingArguments``). Returns the commit URL; a failed push ends the program with one line, after
    joining the other ranks in :func:`mmkd.distributed.shutdown` (they wait there) so the process group ends cleanly.
    The student is saved before this is called."""
    from mmkd.distributed import shutdown

    strategy = getattr(args.hub_strategy, "value", args.hub_strategy)
    if strategy not in ("end", "every_save"):
        print(f"--hub_strategy {strategy}: the recipe pushes the final student only, no checkpoints")
    try:
        url = push_folder(folder, repo_id, token=args.hub_token, private=args.hub_private_repo,
                          revision=args.hub_revision, commit_message="End of training", command=command)
    except (PushError, OSError, ValueError) as err:
        shutdown()
        raise SystemExit(_one_line(err)) from None
    print(f"pushed {folder} to the Hub: {url}")
    return url


def _network_errors() -> tuple[type[BaseException], ...]:
    """What a failed Hub call raises: the HTTP client's errors (transport and status; huggingface_hub 2.x uses
    ``httpx2``, 1.x ``httpx``), OSError (``OfflineModeIsEnabled``, sockets, files), ValueError (a malformed answer,
    rejected card metadata) and RuntimeError (huggingface_hub's wrapper around a failed LFS upload). Anything
    else is a bug and keeps its traceback."""
    import importlib

    from huggingface_hub.errors import HfHubHTTPError

    errors: list[type[BaseException]] = [HfHubHTTPError, OSError, ValueError, RuntimeError]
    for name in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(name).HTTPError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)
