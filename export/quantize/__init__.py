"""INT8 engines: calibrated Q/DQ graphs (static post-training quantization of linear layers).

`qdq` rewrites an fp32 graph (per-channel symmetric INT8 weights, per-tensor symmetric INT8
activations, Q/DQ pairs where TensorRT's explicit quantization expects them); `requests` records
the graph inputs of real requests; `calibrate` turns them into ranges and a per-layer error table;
`cache` keeps the ranges in the build folder; `int8_build` is the build step that ties them
together and refuses a graph whose parity check fails.
"""
