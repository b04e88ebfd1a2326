#!/usr/bin/env python
"""What a heatmap costs: onnxruntime asked for ``probabilities`` alone vs with ``cam``.

    python bench/cam_cost.py --model model-with-cam.onnx --images DIR [--n 300] [--rounds 5]

Reads N real images (sorted, recursive), preprocesses them once with the model's own policy,
then times whole passes over them, alternating the requests round by round so that a busy
machine slows all alike; prints medians per image at batch 1 and at the scan batch size.
``--baseline`` adds the same model exported without the map (``cxr-export --no-cam``).

It also asks onnxruntime's profiler which nodes ran. Finding (onnxruntime 1.23, see
docs/heatmaps.md): onnxruntime runs every node of the graph whatever outputs are requested, so
the map's nodes run either way; what a scan without heatmaps saves is only copying the map out.
The script therefore also times the map's own nodes alone, to show what they cost.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np


def _images(root: str, n: int) -> list[str]:
    from cxr.runtime.discover import iter_inputs

    out = []
    for e in iter_inputs([root]):
        if e.skip is None and e.error is None:
            out.append(e.path)
            if len(out) >= n:
                break
    return out


def _session(path: str, threads: int | None, profile_dir: str | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = int(threads or 0)
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as the runtime does
    if profile_dir:
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(profile_dir, "cam")
    return ort.InferenceSession(path, sess_options=so, providers=["CPUExecutionProvider"])


def nodes_run(path: str, x: np.ndarray, outputs: list[str]) -> set[str]:
    """Names of the graph nodes onnxruntime executed for one run asking for ``outputs``."""
    with tempfile.TemporaryDirectory() as tmp:
        sess = _session(path, 1, tmp)
        sess.run(outputs, {sess.get_inputs()[0].name: x})
        with open(sess.end_profiling()) as fh:
            events = json.load(fh)
    suffix = "_kernel_time"
    return {e["name"][: -len(suffix)] for e in events if e.get("cat") == "Node" and e["name"].endswith(suffix)}


def cam_nodes(path: str) -> set[str]:
    """Nodes of onnxruntime's optimised graph that only the ``cam`` output needs (walking back
    from it to the shared trunk); the optimiser renames nodes, hence its graph, not the file's."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.optimized_model_filepath = os.path.join(tmp, "opt.onnx")
        ort.InferenceSession(path, sess_options=so, providers=["CPUExecutionProvider"])
        g = onnx.load(so.optimized_model_filepath, load_external_data=False).graph
    producer = {o: n for n in g.node for o in n.output}

    def ancestors(name):
        seen, stack = set(), [name]
        while stack:
            n = producer.get(stack.pop())
            if n is not None and n.name not in seen:
                seen.add(n.name)
                stack.extend(n.input)
        return seen

    return ancestors("cam") - ancestors(g.output[0].name)


def map_alone_ms(path: str, batch: int, runs: int = 200) -> float:
    """Median ms of the map's 1x1 conv alone, on a feature map of the model's shape."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    m = onnx.load(path, load_external_data=False)
    g = m.graph
    node = next(n for n in g.node if "cam" in n.output)
    inits = {i.name: i for i in g.initializer}
    w = numpy_helper.to_array(inits[node.input[1]])
    k, c = w.shape[:2]
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    grid = [d for d in sess.get_outputs()[[o.name for o in sess.get_outputs()].index("cam")].shape[2:]]
    inputs, weights = ["f", "W"], [numpy_helper.from_array(w, "W")]
    if len(node.input) > 2:  # an int8 graph may feed the bias through DequantizeLinear: time it as float
        b = inits.get(node.input[2])
        inputs.append("B")
        weights.append(numpy_helper.from_array(
            numpy_helper.to_array(b) if b is not None else np.zeros(k, np.float32), "B"))
    alone = helper.make_model(helper.make_graph(
        [helper.make_node("Conv", inputs, ["cam"])], "cam_alone",
        [helper.make_tensor_value_info("f", onnx.TensorProto.FLOAT, ["N", c, *grid])],
        [helper.make_tensor_value_info("cam", onnx.TensorProto.FLOAT, ["N", k, *grid])], weights),
        opset_imports=[helper.make_opsetid("", 18)])
    alone.ir_version = 8
    s = _session(alone.SerializeToString(), 1)
    f = np.random.default_rng(0).random((batch, c, *grid), dtype=np.float32)
    for _ in range(10):
        s.run(None, {"f": f})
    t = []
    for _ in range(runs):
        t0 = time.perf_counter()
        s.run(None, {"f": f})
        t.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(t)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--images", required=True)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--baseline", help="the same model exported without the map (cxr-export --no-cam)")
    args = ap.parse_args(argv)

    from cxr.runtime.cpu import cpu_info
    from cxr.runtime.imageio import load_image
    from cxr.runtime.metadata import decode_props
    from cxr.runtime.preprocess import preprocess

    sess = _session(args.model, args.threads)
    info = decode_props(sess.get_modelmeta().custom_metadata_map)
    if "cam" not in [o.name for o in sess.get_outputs()]:
        print(f"{args.model} has no 'cam' output", file=sys.stderr)
        return 2
    paths = _images(args.images, args.n)
    x = np.stack([preprocess(load_image(p), info.preprocess) for p in paths])
    name = sess.get_inputs()[0].name
    requests = {"probabilities only": (sess, ["probabilities"]),
                "probabilities + cam": (sess, ["probabilities", "cam"])}
    if args.baseline:
        requests["model without cam"] = (_session(args.baseline, args.threads), ["probabilities"])
    only_cam = cam_nodes(args.model)
    ran = {k: nodes_run(args.model, x[:2], v) for k, (s, v) in requests.items() if s is sess}
    for k, (s, v) in requests.items():
        s.run(v, {name: x[: args.batch]})  # warm-up
    times = {(k, b): [] for k in requests for b in (1, args.batch)}
    for _ in range(args.rounds):
        for b in (1, args.batch):
            for k, (s, outs) in requests.items():
                t0 = time.perf_counter()
                for i in range(0, len(x), b):
                    s.run(outs, {name: x[i:i + b]})
                times[(k, b)].append((time.perf_counter() - t0) * 1e3 / len(x))
    cpu = cpu_info()
    print(f"model {os.path.basename(args.model)} ({info.precision}, {info.arch}); {len(x)} images from "
          f"{args.images}; CPU {cpu['model']}, {cpu['cores']} cores, AVX2 {cpu['avx2']}, VNNI {cpu['vnni']}, "
          f"load avg {cpu['load_avg_1min']}; medians of {args.rounds} interleaved rounds")
    print(f"nodes only the map needs (onnxruntime's optimised graph): {len(only_cam)} ({', '.join(sorted(only_cam))})")
    print(f"{'request':<22} {'map nodes run':>13} {'b1 ms/img':>10} {f'b{args.batch} ms/img':>11}")
    for k in requests:
        med = {b: statistics.median(times[(k, b)]) for b in (1, args.batch)}
        n_run = f"{len(only_cam & ran[k])}/{len(only_cam)}" if k in ran else "-"
        print(f"{k:<22} {n_run:>13} {med[1]:>10.3f} {med[args.batch]:>11.3f}")
    for b in (1, args.batch):
        a = statistics.median(times[("probabilities only", b)])
        c = statistics.median(times[("probabilities + cam", b)])
        print(f"batch {b}: asking for the map costs {c - a:+.3f} ms/image ({100 * (c - a) / a:+.1f}%)")
    for b in (1, args.batch):
        t = map_alone_ms(args.model, b)
        a = statistics.median(times[("probabilities only", b)])
        print(f"the map's conv alone, batch {b}: {1e3 * t / b:.1f} us/image ({100 * t / b / a:.2f}% of the model)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
