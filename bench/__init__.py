"""Benchmarks of MSSAN retrieval: ``python -m bench [--quick]`` writes ``bench/results/``.

Sections: (1) scorer throughput, ONNX Runtime vs PyTorch eager vs a SCAN-style
loop, against this machine's sgemm peak; (2) end-to-end query latency of
two-stage retrieval vs exhaustive scoring per gallery size; (3) recall of
two-stage at each rerank depth relative to exhaustive; (4) encoder throughput
and memory. Nothing here is imported by the library.
"""
