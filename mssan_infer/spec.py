"""The export <-> runtime contract: graph I/O names, dtypes, dynamic axes, tolerances, manifest schema.

``export`` builds its ``torch.onnx.export`` calls and its validation from these
specs, and ``mssan_infer`` feeds the graphs and checks bundles with them, so the
two sides cannot drift apart. Axis names: ``B`` batch, ``R`` regions, ``L`` words,
``Ni``/``Nt`` images/captions in the scorer; ``D``, ``D2`` (= 2D) and ``Dv`` are
fixed by the model config; ``C`` (3 colour channels) is fixed and ``H``/``W`` are
the pixel graph's dynamic image height and width.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "PRECISIONS",
    "TensorSpec",
    "GraphSpec",
    "GRAPHS",
    "IMAGE_ENCODER",
    "TEXT_ENCODER",
    "SCORER",
    "FIXED_AXES",
    "Tolerance",
    "TOLERANCES",
    "DEFAULT_PROFILES",
    "IMAGE_ENCODER_PIXELS",
    "OPTIONAL_GRAPHS",
    "QUERY_SCORERS",
    "SIMILARITY",
    "SCORER_T2I",
    "SCORER_I2T",
    "SCORER_T2I_INT8",
    "SCORER_I2T_INT8",
    "query_scorer",
]

PRECISIONS = ("fp32", "fp16", "int8")  # graph sets a bundle may hold: graphs, fp16_graphs, int8_graphs
FIXED_AXES = ("D", "D2", "Dv", "C")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "float32" | "int64"
    axes: tuple[str, ...]  # symbolic axis names

    def dynamic_axes(self) -> dict[int, str]:
        return {i: a for i, a in enumerate(self.axes) if a not in FIXED_AXES}

    def shape(self, dims: dict[str, int]) -> tuple[int, ...]:
        return tuple(dims[a] for a in self.axes)

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "dtype": self.dtype, "axes": list(self.axes)}


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """The ``dynamic_axes`` argument of ``torch.onnx.export``."""
        return {t.name: t.dynamic_axes() for t in (*self.inputs, *self.outputs) if t.dynamic_axes()}

    def to_dict(self) -> dict[str, object]:
        return {
            "file": self.file,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
        }


F32, I64 = "float32", "int64"

IMAGE_ENCODER = GraphSpec(
    "image_encoder",
    inputs=(TensorSpec("regions", F32, ("B", "R", "Dv")), TensorSpec("region_mask", F32, ("B", "R"))),
    outputs=(
        TensorSpec("img_stage1", F32, ("B", "D2")),
        TensorSpec("img_local", F32, ("B", "R", "D")),
        TensorSpec("img_gram", F32, ("B", "R", "R")),
    ),
)
TEXT_ENCODER = GraphSpec(
    "text_encoder",
    inputs=(TensorSpec("tokens", I64, ("B", "L")), TensorSpec("token_mask", F32, ("B", "L"))),
    outputs=(
        TensorSpec("txt_stage1", F32, ("B", "D2")),
        TensorSpec("txt_local", F32, ("B", "L", "D")),
        TensorSpec("txt_gram", F32, ("B", "L", "L")),
    ),
)
SCORER = GraphSpec(
    "scorer",
    inputs=(
        TensorSpec("img_local", F32, ("Ni", "R", "D")),
        TensorSpec("region_mask", F32, ("Ni", "R")),
        TensorSpec("img_gram", F32, ("Ni", "R", "R")),
        TensorSpec("txt_local", F32, ("Nt", "L", "D")),
        TensorSpec("token_mask", F32, ("Nt", "L")),
        TensorSpec("txt_gram", F32, ("Nt", "L", "L")),
    ),
    outputs=(TensorSpec("s_ll", F32, ("Ni", "Nt")),),  # already multiplied by lam_ll
)
GRAPHS: dict[str, GraphSpec] = {g.name: g for g in (IMAGE_ENCODER, TEXT_ENCODER, SCORER)}

# Optional: backbone + image encoder, from preprocessed pixels (``export --pixels``). Listed in the
# manifest under "optional_graphs", with its preprocessing constants under "preprocessing"."image".
IMAGE_ENCODER_PIXELS = GraphSpec(
    "image_encoder_pixels",
    inputs=(TensorSpec("pixels", F32, ("B", "C", "H", "W")),),
    outputs=IMAGE_ENCODER.outputs,  # R = the backbone's grid cells, all real
)
OPTIONAL_GRAPHS: dict[str, GraphSpec] = {IMAGE_ENCODER_PIXELS.name: IMAGE_ENCODER_PIXELS}

# Query scorers: one query against K candidates of the other modality, the scorer's math specialised to
# that shape (no all-pairs axes) -> ``s_ll [K]`` (already multiplied by lam_ll). ``scorer_t2i`` /
# ``scorer_i2t`` take the candidates' float32 locals already multiplied by the query's,
# ``similarity = c_local @ q_local^T [K, P, Q]``: the runtime computes that product where the candidates'
# rows lie, reading them once, with no copy of their locals. ``*_int8`` take the candidates' locals as
# the ``int8`` layout stores them (codes + 128 as uint8, one float32 scale per vector, float16 Grams)
# and run the big product as an integer GEMM with the query quantized in the graph to 7 bits. Written by
# every export into the fp32 graph table; ONNX Runtime runs them, TensorRT and Triton run ``scorer``.
U8, F16 = "uint8", "float16"
SIMILARITY = "similarity"  # the float32 query scorers' first input: c_local @ q_local^T


def _query_scorer(name: str, query_is_text: bool, int8: bool) -> GraphSpec:
    cand, query = (
        (("img", "region", "Ni", "R"), ("txt", "token", "L"))
        if query_is_text
        else (
            ("txt", "token", "Nt", "L"),
            ("img", "region", "R"),
        )
    )
    c, cm, n, p = cand
    q, qm, qa = query
    if int8:
        cands: tuple[TensorSpec, ...] = (
            TensorSpec(f"{c}_codes", U8, (n, p, "D")),
            TensorSpec(f"{c}_scale", F32, (n, p)),
            TensorSpec(f"{cm}_mask", F32, (n, p)),
            TensorSpec(f"{c}_gram", F16, (n, p, p)),
        )
        queries: tuple[TensorSpec, ...] = (TensorSpec(f"{q}_local", F32, (qa, "D")),)
    else:
        cands = (
            TensorSpec(SIMILARITY, F32, (n, p, qa)),
            TensorSpec(f"{cm}_mask", F32, (n, p)),
            TensorSpec(f"{c}_gram", F32, (n, p, p)),
        )
        queries = ()
    queries += (
        TensorSpec(f"{qm}_mask", F32, (qa,)),
        TensorSpec(f"{q}_gram", F32, (qa, qa)),
    )
    return GraphSpec(name, inputs=(*cands, *queries), outputs=(TensorSpec("s_ll", F32, (n,)),))


SCORER_T2I = _query_scorer("scorer_t2i", True, False)
SCORER_I2T = _query_scorer("scorer_i2t", False, False)
SCORER_T2I_INT8 = _query_scorer("scorer_t2i_int8", True, True)
SCORER_I2T_INT8 = _query_scorer("scorer_i2t_int8", False, True)
QUERY_SCORERS: dict[str, GraphSpec] = {
    g.name: g for g in (SCORER_T2I, SCORER_I2T, SCORER_T2I_INT8, SCORER_I2T_INT8)
}


def query_scorer(query_is_text: bool, int8: bool) -> str:
    """The name of the query scorer for this direction and candidate storage."""
    return f"scorer_{'t2i' if query_is_text else 'i2t'}{'_int8' if int8 else ''}"


@dataclass(frozen=True)
class Tolerance:
    """Per-precision parity tolerances (export fails past them)."""

    atol: float  # max abs diff on every output and on final scores
    rtol: float = 0.0
    rerank_depth: int = 100  # candidates in the rerank-order check
    topk_agreement: float = 1.0  # fraction of top-k (k=10) shared with PyTorch fp32


TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(atol=1e-4),
    "fp16": Tolerance(atol=2e-2, rtol=0.0, rerank_depth=100, topk_agreement=0.9),
    # int8 text encoder (export --int8): a loose bound on every output that catches a broken graph
    # (its outputs are unit vectors and their cosines: a broken graph is off by O(1)); the gate
    # proper is export.int8's check on the synthetic test split (top-10 agreement of a rerank
    # >= 0.9, exhaustive R@1 ratio >= 0.99 both ways). Random ids far from any caption move a
    # good int8 tower further than fp32 parity would allow (the study: docs/design.md §10).
    "int8": Tolerance(atol=0.5, rtol=0.0, rerank_depth=100, topk_agreement=0.0),
}

# TensorRT optimisation profiles / Triton max batch: (min, opt, max) per dynamic axis.
DEFAULT_PROFILES: dict[str, tuple[int, int, int]] = {
    "B": (1, 32, 128),
    "R": (1, 36, 100),
    "L": (1, 16, 64),
    "Ni": (1, 100, 256),
    "Nt": (1, 1, 128),
}
