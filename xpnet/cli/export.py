"""``xpnet export MODEL.npz OUT.onnx``: a trained reader as an ONNX file for onnxruntime in any language."""

from __future__ import annotations


def add_command(sub) -> None:
    """Register ``xpnet export``."""
    p = sub.add_parser(
        "export", help="write a trained reader as an ONNX file (onnxruntime, any language)",
        description="Write the reader in MODEL (a model file written by xpnet train) as an ONNX graph of standard "
                    "operators: input the normalised batch (N, C, H, W) float32, outputs 'probabilities' and "
                    "'logits' (N, length, K). The charset, length, head, xpnet version and the complete "
                    "preprocessing go in the file's metadata as JSON. `xpnet predict OUT.onnx IMAGE...` reads "
                    'with it. Needs the onnx extra: pip install "xpnet[onnx]".')
    p.add_argument("model", metavar="MODEL", help="model file written by xpnet train (model.npz)")
    p.add_argument("out", metavar="OUT", help="the ONNX file to write (reader.onnx); written atomically")
    p.add_argument("--opset", type=int, default=17, metavar="N", help="ONNX opset version (default: 17)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..captcha.export import export_model_file
    from ..errors import UsageError
    from ..nn.onnx_export import require_onnx

    if not str(args.out).lower().endswith(".onnx"):
        raise UsageError(f"OUT must name an .onnx file, got {args.out!r}: Recognizer.load and xpnet predict "
                         "recognise ONNX readers by that extension.")
    require_onnx()  # before the model is read: the missing extra is the first thing to say
    path = export_model_file(args.model, args.out, opset=args.opset)
    print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    return 0
