"""A Triton model repository from a bundle (``python -m export ... --triton``).

Writes ``triton/`` with

- ``image_encoder``, ``text_encoder``: batch on ``B`` (``max_batch_size``: the engines'
  ``B`` maximum in the ``tensorrt`` flavour, else the default ``B`` profile maximum;
  dynamic batching, instance groups);
- ``scorer``: ``max_batch_size: 0`` with ``-1`` dims (its inputs share no batch
  dimension with its output ``[Ni, Nt]``);
- ``retriever`` (Python backend, BLS): two-stage text->image / image->text search
  over a saved mssan_infer index (see ``mssan_infer/triton/retriever_model.py``);
- ``image_encoder_pixels``, when the bundle has the pixel graph (``export --pixels``): the pixel
  graph (fp32 ONNX; on ``onnxruntime`` in the ``tensorrt`` flavour too, which has no engine for it),
  batched like the encoders. The ``retriever`` then takes image files (input ``image``), decoding and
  preprocessing them itself with the bundle's constants (its parameter ``image_preprocessing``) and
  encoding them with this model (BLS) or its ``model.onnx`` (``graphs: local``).

The three graphs run on one of three backends: ``onnxruntime`` (the usual choice
in NVIDIA's tritonserver containers), ``tensorrt`` (the bundle's ``tensorrt/*.plan``)
or ``python`` (ONNX Runtime inside the Python backend, for servers with only the
Python backend). Every ``config.pbtxt`` is validated: parsed into Triton's
``ModelConfig`` protobuf and its names, dtypes and dims checked against the ONNX
graph's inputs and outputs. Each config carries the bundle id as the parameter
``mssan_bundle_id`` so clients can tell which weights a server holds.

The ``tensorrt`` flavour follows the engines, as Triton's TensorRT backend needs:

- ``max_batch_size`` is at most the engines' ``B`` maximum (the backend fits the
  config's dims, batch included, into the profile's max shape and refuses to load
  otherwise: ``TRTv3Interface::MaximumDims`` in tensorrt_backend ``src/instance_state.cc``);
- one instance group per optimisation profile, each listing its ``profile``
  (``ModelInstanceGroup.profile`` in Triton's ``model_config.proto``: without it "the
  server will select the first optimization profile"), so every profile is used and
  no two instances of a GPU share one (TensorRT: "each execution context in concurrent
  use must use a separate optimization profile");
- the ``retriever`` model gets the engines' limits as the JSON parameter
  ``scorer_limits`` (``{"Ni", "Nt", "R", "L"}``, from the manifest's ``tensorrt.limits``;
  ``{}`` for the other flavours) so it can split its scorer calls.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Mapping

from mssan_infer.backends.tensorrt import scorer_limits
from mssan_infer.bundle import bundle_id, id_files
from mssan_infer.errors import BundleError
from mssan_infer.files import link_or_copy, read_versioned_json
from mssan_infer.names import (
    BUNDLE_ID_PARAM,
    FORMAT_VERSION,
    IMAGE_PREPROCESSING_PARAM,
    MANIFEST_FILE,
    RETRIEVER_OUTPUTS,
    RETRIEVER_TOKENIZER,
    SCORER_LIMITS_PARAM,
    TENSORRT_KEY,
    VOCAB_FILE,
    plan_name,
)
from mssan_infer.spec import DEFAULT_PROFILES, GRAPHS, IMAGE_ENCODER_PIXELS, GraphSpec
from mssan_infer.text import words as word_tokenizer
from mssan_infer.triton import ONNX_MODEL, RETRIEVER_MODEL, copy_runtime

from .deployment_step import DeploymentStep
from .errors import ExportError
from .manifest import FP16_DIR, hash_files

__all__ = [
    "TritonSettings",
    "BACKENDS",
    "REPOSITORY_DIR",
    "RETRIEVER",
    "config_text",
    "retriever_config_text",
    "SCORER_LIMITS_PARAM",
    "validate_config",
    "write_repository",
    "install_index",
    "make_step",
]

log = logging.getLogger(__name__)

BACKENDS = ("onnxruntime", "tensorrt", "python")
KINDS = ("auto", "KIND_AUTO", "KIND_CPU", "KIND_GPU")
REPOSITORY_DIR = "triton"
RETRIEVER = "retriever"
RETRIEVER_GRAPHS = ("auto", "local", "bls")
SUBWORD_FILE = "subword_tokenizer.json"  # the Hugging Face tokenizer beside the retriever's tokenizer.json
_TRITON_TYPES = {"float32": "TYPE_FP32", "int64": "TYPE_INT64", "float16": "TYPE_FP16"}
_DYNAMIC_AXES = frozenset(
    a for spec in GRAPHS.values() for t in (*spec.inputs, *spec.outputs) for a in t.dynamic_axes().values()
)
_ONNX_TO_TRITON = {1: "TYPE_FP32", 7: "TYPE_INT64", 10: "TYPE_FP16", 6: "TYPE_INT32", 11: "TYPE_FP64"}


@dataclass(frozen=True)
class TritonSettings:
    """How the repository is written (recorded in the manifest).

    Attributes:
        backend: ``"onnxruntime"``, ``"tensorrt"`` (needs the bundle's engines) or ``"python"``.
        precision: graphs/engines to serve, ``"fp32"`` or ``"fp16"``.
        max_batch_size: encoders' ``max_batch_size`` (default: the ``B`` profile maximum; the
            ``tensorrt`` flavour: the engines' ``B`` maximum, which it may not exceed).
        instances: instances per model (instance_group count; the ``tensorrt`` flavour: one per
            engine profile, default all of them, at most the engines' number of profiles).
        kind: ``"auto"`` (GPU for tensorrt, CPU for python, KIND_AUTO for onnxruntime) or a Triton kind.
        max_queue_delay_us: dynamic batcher delay of the encoders.
        retriever: also write the ``retriever`` BLS model.
        scorer_batch: most candidates per scorer call in the retriever.
        index: an index folder to install into the retriever (``install_index``).
        threads: intra-op threads of ONNX Runtime (0: its default), as the models' parameter
            ``intra_op_thread_count`` (Triton's onnxruntime backend reads the same name).
        retriever_graphs: how the ``retriever`` runs the graphs: ``"auto"``, ``"local"`` (ONNX
            Runtime in its own process) or ``"bls"`` (calls the models); see its ``model.py``.
    """

    backend: str = "onnxruntime"
    precision: str = "fp32"
    max_batch_size: int | None = None
    instances: int | None = None
    kind: str = "auto"
    max_queue_delay_us: int = 100
    retriever: bool = True
    scorer_batch: int = 256
    index: str | None = None
    threads: int = 0
    retriever_graphs: str = "auto"

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ExportError(f"triton backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.precision not in ("fp32", "fp16"):
            raise ExportError(f"triton precision must be 'fp32' or 'fp16', got {self.precision!r}")
        if self.kind not in KINDS:
            raise ExportError(f"triton instance kind must be one of {KINDS}, got {self.kind!r}")
        for name in ("instances", "scorer_batch"):
            v = getattr(self, name)
            if (v is not None or name == "scorer_batch") and (
                not isinstance(v, int) or isinstance(v, bool) or v < 1
            ):
                raise ExportError(f"triton {name} must be a positive int, got {v!r}")
        if self.max_batch_size is not None and (
            not isinstance(self.max_batch_size, int) or self.max_batch_size < 1
        ):
            raise ExportError(f"triton max_batch_size must be a positive int, got {self.max_batch_size!r}")
        if self.retriever_graphs not in RETRIEVER_GRAPHS:
            raise ExportError(
                f"retriever_graphs must be one of {RETRIEVER_GRAPHS}, got {self.retriever_graphs!r}"
            )
        if not isinstance(self.max_queue_delay_us, int) or self.max_queue_delay_us < 0:
            raise ExportError(f"max_queue_delay_us must be an int >= 0, got {self.max_queue_delay_us!r}")

    @property
    def instance_kind(self) -> str:
        if self.kind != "auto":
            return self.kind
        return {"tensorrt": "KIND_GPU", "python": "KIND_CPU"}.get(self.backend, "KIND_AUTO")


# ---- config text ------------------------------------------------------------------
def _dims(spec_axes: tuple[str, ...], dims: Mapping[str, int]) -> str:
    return ", ".join(str(dims[a]) if a in dims else "-1" for a in spec_axes)


def _io(kind: str, tensors: Any, dims: Mapping[str, int], batched: bool) -> str:
    items = []
    for t in tensors:
        axes = t.axes[1:] if batched else t.axes
        items.append(
            f'  {{\n    name: "{t.name}"\n    data_type: {_TRITON_TYPES[t.dtype]}\n'
            f"    dims: [ {_dims(axes, dims)} ]\n  }}"
        )
    return f"{kind} [\n" + ",\n".join(items) + "\n]\n"


def _params(params: Mapping[str, str]) -> str:
    return "".join(
        f'parameters {{\n  key: "{k}"\n  value: {{ string_value: {json.dumps(str(v))} }}\n}}\n'
        for k, v in params.items()
    )


def _instance_groups(kind: str, count: int, profiles: int | None) -> str:
    """``instance_group``: ``count`` instances, or (``profiles``: the tensorrt flavour) one group per profile
    0..count-1."""
    if profiles is None:
        groups = [f"  {{\n    count: {count}\n    kind: {kind}\n  }}"]
    else:
        groups = [
            f'  {{\n    name: "profile_{p}"\n    count: 1\n    kind: {kind}\n    profile: [ "{p}" ]\n  }}'
            for p in range(count)
        ]
    return "instance_group [\n" + ",\n".join(groups) + "\n]\n"


def config_text(
    spec: GraphSpec,
    dims: Mapping[str, int],
    settings: TritonSettings,
    *,
    bundle_id: str,
    max_batch_size: int,
    profiles: int | None = None,
) -> str:
    """``config.pbtxt`` of one graph. Encoders batch on ``B``; the scorer has ``max_batch_size: 0``.

    Args:
        profiles: the engines' number of optimisation profiles (``tensorrt`` flavour): one
            instance group per profile used, each naming its profile.
    """
    batched = spec.name != "scorer"
    platform = {
        "onnxruntime": 'backend: "onnxruntime"',
        "tensorrt": 'backend: "tensorrt"',
        "python": 'backend: "python"',
    }[settings.backend]
    text = f'name: "{spec.name}"\n{platform}\nmax_batch_size: {max_batch_size if batched else 0}\n'
    text += _io("input", spec.inputs, dims, batched) + _io("output", spec.outputs, dims, batched)
    if batched:
        text += f"dynamic_batching {{\n  max_queue_delay_microseconds: {settings.max_queue_delay_us}\n}}\n"
    count = settings.instances or (profiles or 1)
    text += _instance_groups(settings.instance_kind, count, profiles)
    params = {BUNDLE_ID_PARAM: bundle_id, "mssan_precision": settings.precision}
    if settings.backend != "tensorrt" and settings.threads:
        params["intra_op_thread_count"] = str(settings.threads)
    return text + _params(params)


def retriever_config_text(
    dims: Mapping[str, int],
    settings: TritonSettings,
    *,
    bundle_id: str,
    limits: Mapping[str, int] | None = None,
    image_preprocessing: Mapping[str, Any] | None = None,
) -> str:
    """``config.pbtxt`` of the ``retriever`` BLS model (Python backend, one query per request).

    ``limits``: the scorer's largest ``Ni``/``Nt``/``R``/``L`` per call (``scorer_limits`` of the
    manifest), written as the JSON parameter ``scorer_limits`` (``{}``: none).
    ``image_preprocessing``: the manifest's ``preprocessing.image`` when the repository has the pixel
    model (the parameter ``image_preprocessing``; empty: the input ``image`` is refused with a message).
    """
    inputs = [
        ("text", "TYPE_STRING", "1"),
        ("image", "TYPE_STRING", "1"),  # the bytes of one image file (raw, or base64 text)
        ("regions", "TYPE_FP32", f"-1, {dims['Dv']}"),
        ("region_mask", "TYPE_FP32", "-1"),
        ("k", "TYPE_INT32", "1"),
        ("rerank", "TYPE_INT32", "1"),
    ]
    # per hit: ids, texts, sources ("" when none) and metadata (a JSON object) as text; scores and stage1
    outputs = [(n, "TYPE_FP32" if n in ("scores", "stage1") else "TYPE_STRING") for n in RETRIEVER_OUTPUTS]
    text = f'name: "{RETRIEVER}"\nbackend: "python"\nmax_batch_size: 0\n'
    text += (
        "input [\n"
        + ",\n".join(
            f'  {{\n    name: "{n}"\n    data_type: {t}\n    dims: [ {d} ]\n    optional: true\n  }}'
            for n, t, d in inputs
        )
        + "\n]\n"
    )
    text += (
        "output [\n"
        + ",\n".join(f'  {{\n    name: "{n}"\n    data_type: {t}\n    dims: [ -1 ]\n  }}' for n, t in outputs)
        + "\n]\n"
    )
    text += _instance_groups("KIND_CPU", settings.instances or 1, None)
    return text + _params(
        {
            BUNDLE_ID_PARAM: bundle_id,
            "index_dir": "index",
            "tokenizer": RETRIEVER_TOKENIZER,
            "scorer_batch": str(settings.scorer_batch),
            "verify_index": "true",
            SCORER_LIMITS_PARAM: json.dumps(dict(limits or {}), sort_keys=True),
            "image_encoder": "image_encoder",
            "text_encoder": "text_encoder",
            "scorer": "scorer",
            IMAGE_ENCODER_PIXELS.name: IMAGE_ENCODER_PIXELS.name,
            IMAGE_PREPROCESSING_PARAM: (
                json.dumps(dict(image_preprocessing), sort_keys=True) if image_preprocessing else ""
            ),
            "graphs": settings.retriever_graphs,
            "intra_op_thread_count": str(settings.threads),
            "gallery": "",
            "embed_size": str(dims["D"]),
        }
    )


# ---- validation ----------------------------------------------------------------------
def _parse(text: str, where: str) -> Any:
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as e:
        raise ExportError(
            "validating Triton configs needs tritonclient[grpc] (Triton's ModelConfig protobuf): "
            f"`pip install 'tritonclient[grpc]'` or `pip install mssan[triton]` ({e})"
        ) from e
    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as e:
        raise ExportError(f"{where} is not a valid Triton ModelConfig: {e}") from e


def validate_config(config: str | os.PathLike[str], onnx_path: str | os.PathLike[str] | None = None) -> Any:
    """Parse a ``config.pbtxt`` into ``ModelConfig`` and check it against its ONNX graph.

    Checks: every graph input/output is declared once with the graph's dtype and dims
    (``-1`` exactly where the graph is symbolic, the fixed size elsewhere; the leading
    batch dim omitted when ``max_batch_size > 0``), nothing extra, and a batched
    model's graph tensors all start with the same symbolic axis.

    Returns:
        The parsed ``ModelConfig``.
    Raises:
        ExportError: listing every mismatch.
    """
    path = Path(config)
    cfg = _parse(path.read_text(encoding="utf-8"), str(path))
    problems: list[str] = []
    if not cfg.name:
        problems.append("no model name")
    if onnx_path is not None:
        import onnx

        graph = onnx.load(str(onnx_path), load_external_data=False).graph
        batched = cfg.max_batch_size > 0
        for kind, declared, actual in (
            ("input", cfg.input, graph.input),
            ("output", cfg.output, graph.output),
        ):
            inits = {i.name for i in graph.initializer}
            tensors = {v.name: v for v in actual if v.name not in inits}
            seen = {}
            for d in declared:
                if d.name in seen:
                    problems.append(f"{kind} {d.name} declared twice")
                seen[d.name] = d
            for name in sorted(set(seen) - set(tensors)):
                problems.append(f"{kind} {name} is not a graph {kind} (graph has {sorted(tensors)})")
            for name, v in tensors.items():
                if name not in seen:
                    problems.append(f"graph {kind} {name} missing from the config")
                    continue
                d = seen[name]
                ttype = v.type.tensor_type
                want_type = _ONNX_TO_TRITON.get(ttype.elem_type, f"onnx elem_type {ttype.elem_type}")
                got_type = _model_config_type_name(d.data_type)
                if got_type != want_type:
                    problems.append(f"{kind} {name}: data_type {got_type}, graph has {want_type}")
                gdims = [x.dim_value if x.HasField("dim_value") else -1 for x in ttype.shape.dim]
                gnames = [x.dim_param if not x.HasField("dim_value") else "" for x in ttype.shape.dim]
                if batched:
                    if not gdims or gdims[0] != -1:
                        problems.append(
                            f"{kind} {name}: max_batch_size > 0 but the graph's first dim is {gdims[:1]}, "
                            "not dynamic"
                        )
                    gdims, gnames = gdims[1:], gnames[1:]
                cdims = list(d.dims)
                if len(cdims) != len(gdims):
                    problems.append(
                        f"{kind} {name}: dims {cdims} (rank {len(cdims)}), graph has rank {len(gdims)} "
                        f"{gdims}"
                    )
                    continue
                for pos, (c, g, sym) in enumerate(zip(cdims, gdims, gnames)):
                    # graph fixed: the config must say the same size; graph symbolic: -1, or a fixed
                    # size only where the exporter lost a fixed axis (D, 2D) -- never a spec dynamic axis
                    if g >= 0 and c != g:
                        problems.append(f"{kind} {name}: dim {pos} is {c}, graph has {g}")
                    elif g < 0 and c != -1 and (sym in _DYNAMIC_AXES or c < 1):
                        problems.append(
                            f"{kind} {name}: dim {pos} is {c}, but the graph's axis {sym or '?'} is dynamic "
                            "(-1)"
                        )
        if batched:
            firsts = {
                x.type.tensor_type.shape.dim[0].dim_param
                for x in (*graph.input, *graph.output)
                if x.name not in {i.name for i in graph.initializer} and x.type.tensor_type.shape.dim
            }
            if len(firsts) != 1 or "" in firsts:
                problems.append(
                    f"max_batch_size > 0 needs one shared symbolic batch axis; graph has {sorted(firsts)}"
                )
    if problems:
        raise ExportError(f"{path} does not match {onnx_path or 'its model'}:\n  " + "\n  ".join(problems))
    return cfg


def _model_config_type_name(value: int) -> str:
    from tritonclient.grpc import model_config_pb2

    return str(model_config_pb2.DataType.Name(value))


# ---- writing ---------------------------------------------------------------------------
def _manifest(root: Path) -> dict[str, Any] | None:
    """The manifest of the bundle in ``root`` (format and version checked; its files are not hashed: a
    bundle being extended by ``add_to_bundle`` has new files), or None for a bundle under construction.

    Raises:
        BundleError: an unreadable, damaged or newer-format manifest.
    """
    path = root / MANIFEST_FILE
    if not path.is_file():
        return None
    m = read_versioned_json(path, error=BundleError, fix="re-export the bundle", version=FORMAT_VERSION)
    if not isinstance(m.get("files"), dict):
        raise BundleError(f"{path} has no files table; re-export the bundle")
    return m


def _bundle_id(root: Path) -> str:
    m = _manifest(root)
    if m is not None:
        files = m["files"]
        tk = m.get("tokenizer") or {}
        tokenizer = str(tk.get("file") or tk.get("vocab", VOCAB_FILE))
    else:  # a bundle under construction: files as the manifest will list them
        files, tokenizer = hash_files(root), VOCAB_FILE
    return bundle_id(id_files(files, (spec.file for spec in GRAPHS.values()), tokenizer))


def _tokenizer_spec(
    root: Path, max_len: int | None, model_config: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The retriever's ``tokenizer.json``: the word tokenizer's settings (as the manifest records them) and
    its
    vocabulary, or, for a transformer tower, ``kind: "subword"`` with the name of the Hugging Face tokenizer
    file
    copied beside it (``SUBWORD_FILE``, from ``source``). The retriever loads either with the runtime's loader
    (``core.subword.load_text_tokenizer``), so both give the same ids."""
    tk: dict[str, Any] = {}
    m = _manifest(root)
    if m is not None:
        tk = dict(m.get("tokenizer") or {})
    elif model_config is not None:  # a bundle under construction inside export_bundle
        from training.config import ModelConfig

        from .manifest import tokenizer_entry

        tk = tokenizer_entry(root, ModelConfig.from_dict(dict(model_config)))
    if tk.get("kind") == "subword":
        return {
            "kind": "subword",
            "file": SUBWORD_FILE,
            "source": tk["file"],
            "sha256": tk["sha256"],
            "encode": (
                "tokenizers.Tokenizer.from_file(file).encode(text, add_special_tokens=False).ids[:max_len]"
            ),
            "max_len": int(max_len if max_len is not None else tk["max_len"]),
            "prefix_ids": tk["prefix_ids"],
            "suffix_ids": tk["suffix_ids"],
            "unk_id": tk["unk_id"],
        }
    if max_len is not None:
        tk["max_len"] = int(max_len)
    if "max_len" not in tk:
        log.warning(
            "tokenizer max_len unknown (no manifest yet); the retriever truncates captions at %d words",
            DEFAULT_PROFILES["L"][2],
        )
        tk["max_len"] = DEFAULT_PROFILES["L"][2]
    word_tokenizer.check_settings(tk, f"bundle {root}")
    vocab = json.loads((root / tk.get("vocab", "vocab.json")).read_text(encoding="utf-8"))
    return {**word_tokenizer.settings(int(tk["max_len"])), "vocab": vocab}


def _batching(
    root: Path, settings: TritonSettings, tensorrt: Mapping[str, Any] | None
) -> tuple[int, int | None, dict[str, int] | None]:
    """``(encoders' max_batch_size, engine profiles or None, scorer limits or None)`` for ``settings``."""
    if settings.backend != "tensorrt":
        return settings.max_batch_size or DEFAULT_PROFILES["B"][2], None, None
    record = tensorrt
    if record is None:
        record = (_manifest(root) or {}).get(TENSORRT_KEY)
    if not isinstance(record, Mapping) or not isinstance(record.get("limits"), Mapping):
        raise ExportError(
            "--triton-backend tensorrt needs the manifest's tensorrt record (engine profiles and limits); "
            "export with --tensorrt in the same export, or write the repository from a bundle built with it"
        )
    try:
        b_max = int(record["limits"]["B"])
        profiles = int(record["settings"]["num_profiles"])
    except (KeyError, TypeError, ValueError) as e:
        raise ExportError(f"the manifest's tensorrt record lacks {e}; re-export with --tensorrt") from e
    if settings.max_batch_size is not None and settings.max_batch_size > b_max:
        raise ExportError(
            f"--triton-max-batch {settings.max_batch_size} is above the engines' B maximum {b_max}: Triton's "
            f"TensorRT backend would refuse to load them. Use at most {b_max}, or rebuild with "
            "--trt-profile B=1,OPT,MAX"
        )
    if settings.instances is not None and settings.instances > profiles:
        raise ExportError(
            f"--triton-instances {settings.instances} is above the engines' {profiles} optimisation "
            "profile(s): "
            "instances on one GPU must each use their own profile. Rebuild with --trt-profiles N"
        )
    return settings.max_batch_size or b_max, profiles, scorer_limits({TENSORRT_KEY: record})


def _pixel_graph(root: Path, pixels: Mapping[str, Any] | None) -> tuple[Path, dict[str, Any]] | None:
    """``(the pixel graph's ONNX file, its preprocessing entry)`` when the bundle has the pixel graph.

    ``pixels``: the manifest entries ``optional_graphs`` and ``preprocessing`` when ``root`` has no
    manifest yet (a bundle under construction); else they are read from its manifest.

    Raises:
        ExportError: a pixel graph without its file or its preprocessing entry.
    """
    m: Mapping[str, Any] = _manifest(root) or pixels or {}
    entry = (m.get("optional_graphs") or {}).get(IMAGE_ENCODER_PIXELS.name)
    if not isinstance(entry, Mapping):
        return None
    prep = (m.get("preprocessing") or {}).get("image")
    src = root / str(entry.get("file") or IMAGE_ENCODER_PIXELS.file)
    if not isinstance(prep, Mapping) or not src.is_file():
        lacks = f"its file {src.name}" if isinstance(prep, Mapping) else "its preprocessing.image entry"
        raise ExportError(
            f"bundle {root} lists the pixel graph but lacks {lacks}; re-export it with --pixels"
        )
    return src, dict(prep)


def write_repository(
    root: str | os.PathLike[str],
    settings: TritonSettings | None = None,
    *,
    out: str | os.PathLike[str] | None = None,
    max_len: int | None = None,
    tensorrt: Mapping[str, Any] | None = None,
    model_config: Mapping[str, Any] | None = None,
    pixels: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write (and validate) a Triton model repository for the bundle in ``root``.

    Args:
        root: a bundle folder (finished, or under construction inside ``export_bundle``).
        settings: backend, batching, instances, retriever.
        out: the repository folder (default ``root/triton``); replaced if it exists.
        max_len: the tokenizer's ``max_len`` when ``root`` has no manifest yet.
        tensorrt: the manifest's ``tensorrt`` record when ``root`` has no manifest yet (the
            ``tensorrt`` flavour takes ``max_batch_size``, profiles and limits from it).
        model_config: the model config when ``root`` has no manifest yet (the tokenizer's kind).
        pixels: the manifest entries ``optional_graphs`` and ``preprocessing`` when ``root`` has no
            manifest yet; with the pixel graph the repository gets the model ``image_encoder_pixels`` and
            the ``retriever`` takes image files.
    Returns:
        ``{"triton": record}`` for the manifest.
    Raises:
        ExportError: ``tensorrt`` flavour without engines, a ``max_batch_size`` or instance count
            the engines cannot serve, a missing fp16 graph, or a config that does not validate
            against its graph.
    """
    from .tensorrt import bundle_dims

    settings = settings or TritonSettings()
    rootp = Path(root)
    dest = Path(out) if out is not None else rootp / REPOSITORY_DIR
    dims, _ = bundle_dims(rootp)
    bundle_id = _bundle_id(rootp)
    mbs, profiles, limits = _batching(rootp, settings, tensorrt)
    sources: dict[str, Path] = {}
    for graph, spec in GRAPHS.items():
        if settings.backend == "tensorrt":
            src = rootp / plan_name(graph, settings.precision)
            if not src.is_file():
                raise ExportError(
                    f"--triton-backend tensorrt needs the bundle's {settings.precision} engine {src.name}; "
                    f"export with --tensorrt{' --fp16' if settings.precision == 'fp16' else ''} on a GPU "
                    "machine"
                )
        else:
            src = rootp / spec.file if settings.precision == "fp32" else rootp / FP16_DIR / spec.file
            if not src.is_file():
                raise ExportError(f"bundle has no {settings.precision} graph {src.name}; export with --fp16")
        sources[graph] = src
    pixel_graph = _pixel_graph(rootp, pixels)
    tmp = Path(
        tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent if dest.parent.exists() else None)
    )
    try:
        models: dict[str, Any] = {}
        for graph, spec in GRAPHS.items():
            mdir = tmp / graph / "1"
            mdir.mkdir(parents=True)
            fname = "model.plan" if settings.backend == "tensorrt" else "model.onnx"
            shutil.copyfile(sources[graph], mdir / fname)
            if settings.backend == "python":
                shutil.copyfile(ONNX_MODEL, mdir / "model.py")
                copy_runtime(mdir)
            cfg_path = tmp / graph / "config.pbtxt"
            cfg_path.write_text(
                config_text(spec, dims, settings, bundle_id=bundle_id, max_batch_size=mbs, profiles=profiles),
                encoding="utf-8",
            )
            onnx_ref = rootp / spec.file if settings.precision == "fp32" else rootp / FP16_DIR / spec.file
            validate_config(cfg_path, onnx_ref)
            models[graph] = {
                "config": f"{graph}/config.pbtxt",
                "model": f"{graph}/1/{fname}",
                "max_batch_size": mbs if graph != "scorer" else 0,
                "instances": settings.instances or (profiles or 1),
            }
        if pixel_graph is not None:  # fp32 ONNX only: the tensorrt flavour serves it on onnxruntime
            spec = IMAGE_ENCODER_PIXELS
            pix_settings = replace(
                settings,
                backend="python" if settings.backend == "python" else "onnxruntime",
                precision="fp32",
            )
            mdir = tmp / spec.name / "1"
            mdir.mkdir(parents=True)
            shutil.copyfile(pixel_graph[0], mdir / "model.onnx")
            if pix_settings.backend == "python":
                shutil.copyfile(ONNX_MODEL, mdir / "model.py")
                copy_runtime(mdir)
            cfg_path = tmp / spec.name / "config.pbtxt"
            cfg_path.write_text(
                config_text(spec, {**dims, "C": 3}, pix_settings, bundle_id=bundle_id, max_batch_size=mbs),
                encoding="utf-8",
            )
            validate_config(cfg_path, pixel_graph[0])
            models[spec.name] = {
                "config": f"{spec.name}/config.pbtxt",
                "model": f"{spec.name}/1/model.onnx",
                "max_batch_size": mbs,
                "instances": pix_settings.instances or 1,
            }
        if settings.retriever:
            mdir = tmp / RETRIEVER / "1"
            mdir.mkdir(parents=True)
            shutil.copyfile(RETRIEVER_MODEL, mdir / "model.py")
            copy_runtime(mdir)
            tk = _tokenizer_spec(rootp, max_len, model_config)
            (mdir / RETRIEVER_TOKENIZER).write_text(json.dumps(tk, ensure_ascii=False), encoding="utf-8")
            if tk.get("kind") == "subword":
                shutil.copyfile(rootp / tk.pop("source"), mdir / tk["file"])
            cfg_path = tmp / RETRIEVER / "config.pbtxt"
            cfg_path.write_text(
                retriever_config_text(
                    dims,
                    settings,
                    bundle_id=bundle_id,
                    limits=limits,
                    image_preprocessing=pixel_graph[1] if pixel_graph is not None else None,
                ),
                encoding="utf-8",
            )
            validate_config(cfg_path)
            models[RETRIEVER] = {"config": f"{RETRIEVER}/config.pbtxt", "model": f"{RETRIEVER}/1/model.py"}
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if settings.index:
        install_index(dest, settings.index)
    log.info("Triton repository (%s backend, %s) written to %s", settings.backend, settings.precision, dest)
    try:
        rel = dest.resolve().relative_to(rootp.resolve()).as_posix()
    except ValueError:
        rel = str(dest)
    record = {
        "repository": rel,
        "settings": asdict(settings),
        "bundle_id": bundle_id,
        "models": models,
        "validated": "config.pbtxt parsed into tritonclient.grpc.model_config_pb2.ModelConfig; "
        "names, dtypes and dims checked against the ONNX graphs",
    }
    return {"triton": record}


def install_index(
    repository: str | os.PathLike[str], index: str | os.PathLike[str], *, link: bool = False
) -> Path:
    """Copy a saved mssan_infer index into ``repository/retriever/1/index`` (replacing any).

    The index must come from the bundle the repository was written from. ``link``: hard-link its files
    where the file system can (an index's files are never written in place: a save replaces the folder).

    Raises:
        ExportError: no retriever model, or the index is missing/from another bundle.
    """
    from mssan_infer.errors import IndexFileError
    from mssan_infer.gallery.folder import read_index_manifest

    repo, src = Path(repository), Path(index)
    cfg_path = repo / RETRIEVER / "config.pbtxt"
    if not cfg_path.is_file():
        raise ExportError(f"{repo} has no {RETRIEVER} model; write the repository with the retriever enabled")
    try:
        manifest = read_index_manifest(src)
    except IndexFileError as e:
        raise ExportError(str(e)) from e
    cfg = _parse(cfg_path.read_text(encoding="utf-8"), str(cfg_path))
    want = cfg.parameters[BUNDLE_ID_PARAM].string_value if BUNDLE_ID_PARAM in cfg.parameters else ""
    if want and manifest["bundle_id"] != want:
        raise ExportError(
            f"index {src} was built with bundle {manifest['bundle_id']}, but the repository serves {want}; "
            "build the index with the same bundle"
        )
    dest = repo / RETRIEVER / "1" / "index"
    tmp = dest.with_name(f".index.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, copy_function=link_or_copy if link else shutil.copy2)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return dest


def make_step(settings: TritonSettings | None = None) -> DeploymentStep:
    """The ``--triton`` deployment step of ``export_bundle``: ``step(tmp, manifest_extra) -> manifest
    entries``."""
    settings = settings or TritonSettings()
    _parse('name: "probe"', "probe")  # fail fast when tritonclient[grpc] is missing

    def step(root: Path, extra: Mapping[str, Any]) -> dict[str, Any]:
        if settings.backend == "tensorrt" and TENSORRT_KEY not in extra:
            raise ExportError(
                "--triton-backend tensorrt needs --tensorrt in the same export (or an earlier one)"
            )
        mcfg = extra.get("model_config") or {}  # export_bundle passes the model config
        return write_repository(
            root,
            settings,
            max_len=mcfg.get("max_len"),
            tensorrt=extra.get(TENSORRT_KEY),
            model_config=mcfg or None,
            pixels=extra,
        )

    return step
