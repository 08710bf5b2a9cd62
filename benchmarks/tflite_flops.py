"""TFLite float32 throughput as GFLOP/s against this CPU's peak (issue 12, item 6).

    PYTHONPATH=. .venv/bin/python benchmarks/tflite_flops.py [--models demo,b3] [--out F.json] [--md F.md]

Builds each model in the script (untrained, ``weights=None``: speed only), exports the two-signature
edge SavedModel and converts it to float32 TFLite exactly as ``lumbar-tf export`` does
(`export.saved_model.write_edge_saved_model`, `export.tflite.convert_tflite`), then:
  * counts the FLOPs of each signature from the TFLite graph itself (2 x multiply-accumulates of
    CONV_2D, DEPTHWISE_CONV_2D and FULLY_CONNECTED, read from the flatbuffer's tensor shapes; every
    other op counts one FLOP per output element, reported apart);
  * times ``localize`` (batch 1 and 16 studies) and ``grade`` (batch 1, 5 crops = one study, 80 =
    16 studies) with the LiteRT interpreter (XNNPACK, the default delegate) at 2 and 1 threads, and
    once without XNNPACK; medians of timed invokes after a warm-up;
  * reports GFLOP/s and the share of this CPU's float32 peak, measured at the start of the run
    (`machine.fma_peak_gflops`: independent FMAs at the widest vector ``-march=native`` gives, on
    every core; a VM shows neither the boost clock nor the FMA width) or given with ``--peak``, and
    the share of a float32 matrix product timed at the start and end of the same run
    (`machine.sgemm_gflops`, numpy's BLAS on all cores).
Models: ``demo`` is `configs/cpu_demo.yaml` (small CNN grader on 64 px crops, 192 px views), ``b3``
the GPU default `configs/gpu_effnetb3.yaml` (EfficientNetB3 on 256 px crops, 512 px views, 256 px
localiser input). The machine is shared: quote the load (printed) beside the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import cpu_facts, describe, fma_peak_gflops, sgemm_gflops

CONFIGS = {"demo": "cpu_demo", "b3": "gpu_effnetb3"}
BATCHES = {"localize": (1, 16), "grade": (1, 5, 80)}
MAC_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "BATCH_MATMUL", "TRANSPOSE_CONV")


def build_tflite(name: str, work: Path) -> tuple[bytes, object, object]:
    """Float32 TFLite bytes of the untrained model of config ``name``, its preprocess config and
    the end-to-end Keras model."""
    from lumbar_tf.core.config import builtin_config, load_config
    from lumbar_tf.export.saved_model import write_edge_saved_model
    from lumbar_tf.export.tflite import convert_tflite
    from lumbar_tf.models.end_to_end import build_end_to_end
    from lumbar_tf.models.networks import build_grader, build_localizer

    cfg = load_config(builtin_config(CONFIGS[name]), ["model.weights=null"])
    p = cfg.preprocess
    localizer = build_localizer(p.view_size, cfg.model)
    grader = build_grader(p.crop_size, p.view_names, cfg.model)
    model = build_end_to_end(localizer, grader, p)
    edge = work / f"edge-{name}"
    write_edge_saved_model(model, p, edge)
    content, _ = convert_tflite(edge, "float32")
    return content, p, model


def static_grade_tflite(model, p, batch: int, work: Path) -> bytes:
    """The ``grade`` signature alone, converted as the export does but with a fixed batch of ``batch``
    level crops (the export's batch dimension is dynamic)."""
    import keras
    import tensorflow as tf

    from lumbar_tf.core.contract import GRADE, LEVEL_INDEX, THRESHOLD_PROBS
    from lumbar_tf.export.tflite import _convert, check_builtin_only

    grader = model.get_layer("grader")
    archive = keras.export.ExportArchive()

    def grade(crops):
        return {THRESHOLD_PROBS: keras.ops.sigmoid(grader(crops, training=False))}

    c = p.crop_size
    specs = {name: tf.TensorSpec([batch, c, c, 3], tf.float32, name=name) for name in p.view_names}
    specs[LEVEL_INDEX] = tf.TensorSpec([batch], tf.int32, name=LEVEL_INDEX)
    archive.add_endpoint(GRADE, grade, input_signature=[specs])
    path = work / f"static-{batch}"
    archive.write_out(str(path), verbose=False)
    converter = tf.lite.TFLiteConverter.from_saved_model(str(path), signature_keys=[GRADE])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    content = _convert(converter)
    check_builtin_only(content, "float32")
    return content


def _builtin_names() -> dict[int, str]:
    from tensorflow.lite.python import schema_py_generated as schema

    return {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}


def count_flops(content: bytes) -> dict[str, dict]:
    """Per signature: FLOPs of one batch element, split into multiply-accumulate ops and the rest."""
    from tensorflow.lite.python import schema_py_generated as schema

    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(content, 0))
    names = _builtin_names()
    out = {}
    for sig in model.signatureDefs:
        key = sig.signatureKey.decode() if isinstance(sig.signatureKey, bytes) else sig.signatureKey
        graph = model.subgraphs[sig.subgraphIndex]
        shape = [[int(d) for d in t.shape] if t.shape is not None else [] for t in graph.tensors]
        mac, other, by_op = 0, 0, {}
        for op in graph.operators:
            code = model.operatorCodes[op.opcodeIndex]
            kind = names.get(max(code.builtinCode, code.deprecatedBuiltinCode), "CUSTOM")
            outs = [math.prod(shape[i]) for i in op.outputs if i >= 0]
            if kind in ("CONV_2D", "TRANSPOSE_CONV"):
                kh, kw, ci = shape[op.inputs[1 if kind == "CONV_2D" else 1]][1:4]
                flops = 2 * outs[0] * kh * kw * ci
            elif kind == "DEPTHWISE_CONV_2D":
                _, kh, kw, _ = shape[op.inputs[1]]
                flops = 2 * outs[0] * kh * kw
            elif kind == "FULLY_CONNECTED":
                flops = 2 * outs[0] * shape[op.inputs[1]][-1]
            elif kind == "BATCH_MATMUL":
                flops = 2 * outs[0] * shape[op.inputs[0]][-1]
            else:
                flops = 0
            if kind in MAC_OPS:
                mac += flops
            else:
                other += sum(outs)
            by_op[kind] = by_op.get(kind, 0) + (flops if kind in MAC_OPS else sum(outs))
        # Shapes in the flatbuffer carry batch 1 (dynamic batch = -1 in shape_signature).
        out[key] = {"mac_flops": mac, "other_flops": other, "by_op": by_op}
    return out


def _inputs(runner, batch: int, rng) -> dict[str, np.ndarray]:
    feeds = {}
    for name, detail in runner.get_input_details().items():
        shape = [batch, *detail["shape"][1:]]
        if np.issubdtype(detail["dtype"], np.integer):
            feeds[name] = (np.arange(batch) % 5).astype(detail["dtype"])
        else:
            feeds[name] = rng.uniform(0, 255, shape).astype(detail["dtype"])
    return feeds


def time_signature(content: bytes, key: str, batch: int, threads: int, xnnpack: bool, budget_s: float):
    """Median seconds of one invoke (after a warm-up), timed until ``budget_s`` or 15 invokes."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    resolver = OpResolverType.AUTO if xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    interpreter = Interpreter(
        model_content=content, num_threads=threads, experimental_op_resolver_type=resolver
    )
    runner = interpreter.get_signature_runner(key)
    feeds = _inputs(runner, batch, np.random.default_rng(0))
    runner(**feeds)  # resize, allocate, XNNPACK weight packing
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < budget_s and len(times) < 15):
        t = time.perf_counter()
        runner(**feeds)
        times.append(time.perf_counter() - t)
    return statistics.median(times), len(times)


def _row(key, batch, threads, xnnpack, n, seconds, per_item, peak, **extra) -> dict:
    """One timed setting; ``peak_share`` of the nominal peak (the SGEMM share is added at the end)."""
    gflops = per_item * batch / seconds / 1e9
    return {
        "signature": key,
        "batch": batch,
        "threads": threads,
        "xnnpack": xnnpack,
        **extra,
        "invokes": n,
        "median_ms": seconds * 1e3,
        "ms_per_item": seconds * 1e3 / batch,
        "gflop_per_s": gflops,
        "peak_share": gflops / peak,
    }


def measure(
    name: str, work: Path, peak: float, budget_s: float, static: tuple[int, ...] = (), dynamic: bool = True
) -> dict:
    t = time.perf_counter()
    content, p, model = build_tflite(name, work)
    build_s = time.perf_counter() - t
    flops = count_flops(content)
    rows = []
    settings = [(2, True), (1, True), (2, False)]
    for key, batches in BATCHES.items() if dynamic else ():
        per_item = flops[key]["mac_flops"] + flops[key]["other_flops"]
        for batch in batches:
            for threads, xnnpack in settings:
                if not xnnpack and batch > batches[1]:
                    continue  # the reference kernels on the largest batch take minutes
                seconds, n = time_signature(content, key, batch, threads, xnnpack, budget_s)
                rows.append(_row(key, batch, threads, xnnpack, n, seconds, per_item, peak))
                print(json.dumps({"model": name, **rows[-1]}), flush=True)
    grade_flops = flops["grade"]["mac_flops"] + flops["grade"]["other_flops"]
    for batch in static:  # the same grade graph with a fixed batch dimension
        fixed = static_grade_tflite(model, p, batch, work)
        for threads in (2, 1):
            seconds, n = time_signature(fixed, "grade", batch, threads, True, budget_s)
            rows.append(_row("grade", batch, threads, True, n, seconds, grade_flops, peak, static_batch=True))
            print(json.dumps({"model": name, **rows[-1]}), flush=True)
    return {
        "config": CONFIGS[name],
        "view_size": p.view_size,
        "crop_size": p.crop_size,
        "tflite_bytes": len(content),
        "build_and_convert_s": build_s,
        "flops_per_item": flops,
        "rows": rows,
    }


def to_markdown(result: dict) -> str:
    lines = [
        "# TFLite float32 throughput against peak",
        "",
        f"CPU: {describe(result['cpu'])}. float32 peak: {result['peak_gflops']:.0f} GFLOP/s "
        f"({result['peak_source']}). "
        f"float32 SGEMM ({result['sgemm_n']}^2, numpy's BLAS, all cores) in the same run: "
        f"{result['sgemm_gflops']:.0f} GFLOP/s (start / end {result['sgemm_start']:.0f} / "
        f"{result['sgemm_end']:.0f}). Load average at start / end: "
        f"{result['load_start']} / {result['load_end']}. Command: `{result['command']}`.",
        "",
    ]
    for name, m in result["models"].items():
        lines += [
            f"## {name}: `{m['config']}` (views {m['view_size']} px, crops {m['crop_size']} px)",
            "",
            "| signature | GFLOP per item (MAC ops + other) |",
            "| --- | ---: |",
        ]
        for key, f in m["flops_per_item"].items():
            lines.append(f"| {key} | {f['mac_flops'] / 1e9:.3f} + {f['other_flops'] / 1e9:.4f} |")
        lines += [
            "",
            "| signature | batch | threads | XNNPACK | median ms | ms / item | GFLOP/s | % of peak "
            "| % of SGEMM |",
            "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in m["rows"]:
            batch = f"{r['batch']} (fixed)" if r.get("static_batch") else r["batch"]
            lines.append(
                f"| {r['signature']} | {batch} | {r['threads']} | {'yes' if r['xnnpack'] else 'no'} | "
                f"{r['median_ms']:.1f} | {r['ms_per_item']:.2f} | {r['gflop_per_s']:.1f} | "
                f"{100 * r['peak_share']:.1f} | {100 * r['gflop_per_s'] / result['sgemm_gflops']:.1f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="demo,b3", help="comma-separated: " + ", ".join(CONFIGS))
    parser.add_argument(
        "--peak", type=float, help="float32 peak GFLOP/s of this CPU (default: measured, machine.py)"
    )
    parser.add_argument("--budget", type=float, default=4.0, help="seconds of timed invokes per row")
    parser.add_argument(
        "--static", default="", help="also time grade converted with these fixed batch sizes, e.g. 5,80"
    )
    parser.add_argument("--no-dynamic", action="store_true", help="only the --static rows")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).with_name("tflite_flops_results.json"), help="JSON results"
    )
    parser.add_argument(
        "--md", type=Path, help="also write the tables here (tflite_flops_results.md is kept by hand)"
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lumbar_flops_"))
    peak, source = args.peak, "given with --peak"
    if peak is None:
        peak, source = fma_peak_gflops(), "measured: FMA loop on every core, machine.py"
    if peak is None:
        sys.exit("error: no C compiler to measure the peak with; give --peak GFLOP/s")
    result = {
        "cpu": cpu_facts(),
        "peak_gflops": peak,
        "peak_source": source,
        "sgemm_n": 2048,
        "sgemm_start": sgemm_gflops(2048),
        "load_start": " ".join(f"{v:.1f}" for v in os.getloadavg()),
        "command": "benchmarks/tflite_flops.py " + " ".join(sys.argv[1:]),
        "models": {},
    }
    try:
        for name in args.models.split(","):
            static = tuple(int(b) for b in args.static.split(",") if b)
            result["models"][name] = measure(
                name.strip(), work, peak, args.budget, static, dynamic=not args.no_dynamic
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["load_end"] = " ".join(f"{v:.1f}" for v in os.getloadavg())
    result["sgemm_end"] = sgemm_gflops(2048)
    result["sgemm_gflops"] = statistics.median([result["sgemm_start"], result["sgemm_end"]])
    args.out.write_text(json.dumps(result, indent=1))
    if args.md:
        args.md.write_text(to_markdown(result))
    print(to_markdown(result))


if __name__ == "__main__":
    main()
