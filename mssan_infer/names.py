"""File and key names of bundles, indexes and Triton repositories, in one place.

Everything that two parts of MSSAN must spell the same way (export and the runtime,
the runtime and the Triton ``retriever`` model) is named here.
"""

from __future__ import annotations

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "VOCAB_FILE",
    "INDEX_FORMAT",
    "INDEX_FORMAT_VERSION",
    "INDEX_MANIFEST",
    "IMAGES",
    "TEXTS",
    "GALLERIES",
    "TENSORRT_KEY",
    "LIMITS_KEY",
    "plan_name",
    "BUNDLE_ID_PARAM",
    "RUNTIME_PACKAGE",
    "RETRIEVER_TOKENIZER",
    "SCORER_LIMITS_PARAM",
    "IMAGE_PREPROCESSING_PARAM",
    "RETRIEVER_OUTPUTS",
]

# ---- bundle (``python -m export``) -------------------------------------------------
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
VOCAB_FILE = "vocab.json"

# ---- saved index (``Retriever.save``) -----------------------------------------------
INDEX_FORMAT = "mssan-index"
INDEX_FORMAT_VERSION = 2
INDEX_MANIFEST = "index.json"
IMAGES, TEXTS = "images", "texts"  # the image gallery (searched by text) and the caption gallery
GALLERIES = {IMAGES: "image gallery (searched by text)", TEXTS: "caption gallery (searched by images)"}

# ---- TensorRT engines in a bundle ---------------------------------------------------
TENSORRT_KEY = "tensorrt"  # the manifest's engine record
LIMITS_KEY = "limits"  # in it: the engines' maxima per axis {B, R, L, Ni, Nt}


def plan_name(graph: str, precision: str) -> str:
    """Bundle-relative file of an engine: ``tensorrt/<graph>.plan`` (fp32) or
    ``tensorrt/<graph>.fp16.plan``."""
    return f"tensorrt/{graph}.plan" if precision == "fp32" else f"tensorrt/{graph}.{precision}.plan"


# ---- Triton model repository --------------------------------------------------------
BUNDLE_ID_PARAM = "mssan_bundle_id"  # config.pbtxt parameter naming the bundle a model serves
RUNTIME_PACKAGE = "mssan_infer"  # the runtime package, copied beside the models' model.py
RETRIEVER_TOKENIZER = "tokenizer.json"  # the retriever's tokenizer settings and vocabulary
SCORER_LIMITS_PARAM = "scorer_limits"  # retriever parameter: JSON {"Ni","Nt","R","L"} maxima ({}: none)
# retriever parameter: the pixel graph's preprocessing (the manifest's preprocessing.image, JSON; "": no
# pixel graph, so the retriever's input ``image`` is refused)
IMAGE_PREPROCESSING_PARAM = "image_preprocessing"
# the retriever's outputs, one entry per hit, best first: ids (str(id)), scores and stage1 (FP32), texts,
# sources (a caption's text, an image's source file; "" when none) and metadata (one JSON object each)
RETRIEVER_OUTPUTS = ("ids", "scores", "stage1", "texts", "sources", "metadata")
