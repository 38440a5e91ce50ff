"""A CAPTCHA reader as an ONNX file that any language can run, with everything needed to feed it.

    export_model_file("runs/x/model.npz", "reader.onnx")     # what `xpnet export` does
    export_reader(Recognizer.load("model.npz"), "reader.onnx")

The graph is ``xpnet.nn.onnx_export``'s, with ``length`` positions: input the
normalised batch (N, C, H, W) float32, outputs ``probabilities`` and ``logits``
(N, length, K).  Its ``metadata_props`` (each value JSON) hold the charset,
length, head, xpnet version, the ``Preprocess`` description and the same steps
in words (``preprocessing``, ``normalization``, ``decoding``), so a reader
elsewhere reproduces the input and the reading exactly.  A CTC reader (``head``
"ctc") has outputs (N, T, K + 1) instead: per-column softmax ``probabilities`` and
``logits``, class 0 the blank.
"""

from __future__ import annotations

from pathlib import Path

from .. import __version__
from ..data.images import Preprocess
from ..data.labels import Charset
from ..errors import DataError, ModelFileError, UsageError
from ..nn import serialization as xio
from ..nn.file_header import one_line
from ..nn.onnx_export import OPSET, export_onnx
from .recognizer import Recognizer

NORMALIZATION = {
    "minus_one_one": "x = pixel * (2/255) - 1 in float32, mapping the uint8 values 0..255 to [-1, 1]",
    "zero_one": "x = pixel * (1/255) in float32, mapping the uint8 values 0..255 to [0, 1]",
}
RESIZE = {
    "fit": "scale by s = min(H/h, W/w) keeping the aspect ratio to nw = min(max(1, round(w*s)), W) by "
           "nh = min(max(1, round(h*s)), H) (Python round), then pad to H x W with the image pasted at "
           "((W-nw)//2, (H-nh)//2)",
    "height": "scale by s = H/h keeping the aspect ratio to nw = max(1, round(w*s)) by nh = min(max(1, round(h*s)), H) "
              "(Python round); if nw > W crop columns [(nw-W)//2, (nw-W)//2 + W), else pad to H x W with the image "
              "pasted at ((W-nw)//2, (H-nh)//2)",
    "stretch": "resize to W x H ignoring the aspect ratio",
}
PAD = {
    "border": "padding colour: the per-channel median of the resized image's outermost ring of pixels (first row, "
              "last row, first column, last column, corners counted twice), rounded to an integer",
    "white": "padding colour: 255 in every channel",
}
DECODING = ("for each of the length positions, the character is charset.chars[argmax over the K logits] and its "
            "confidence the sigmoid probability of that class; the text confidence is the product of the length "
            "character confidences")
CTC_DECODING = ("for each of the T columns take the argmax over the K + 1 logits; merge repeated classes in "
                "consecutive columns, then drop class 0 (the blank); class i + 1 is charset.chars[i]. A character's "
                "confidence is the highest probability of its class over the columns that emitted it, the text "
                "confidence the product of the character confidences (an empty text: the lowest blank probability "
                "over the columns). When the metadata has \"lengths\": [lo, hi] and that text has another length, "
                "read instead the most probable column path (the largest sum of log-probabilities) whose text has lo "
                "to hi characters: a Viterbi pass over the states (characters emitted so far, class of the column)")
KEPT = ("model", "config")  # training metadata worth carrying (never local paths: the data description stays out)


def preprocessing_text(pp: Preprocess) -> str:
    """The preprocessing ``pp`` describes, step by step in words (what ``Preprocess.to_array`` does)."""
    colour = ("RGB; 8-bit grey (L) becomes RGB by repeating the grey channel" if pp.channels == 3 else
              "8-bit grey L (Pillow's ITU-R 601-2 luma from RGB: L = R*299/1000 + G*587/1000 + B*114/1000)")
    steps = [
        "decode the first frame of the image",
        f"convert it to {colour}; transparency is composited onto white; 16-bit grey is scaled by 1/257 "
        "(xpnet.data.images documents the other modes)",
        f"resize ({pp.resize}) to H={pp.height}, W={pp.width} with Pillow's {pp.resample} filter "
        f"(Image.resize, antialiased when shrinking): {RESIZE[pp.resize]}",
    ]
    if pp.resize != "stretch":
        steps.append(PAD[pp.pad])
    steps += [f"as a uint8 array channels first: (C, H, W) = ({pp.channels}, {pp.height}, {pp.width}), "
              "a batch (N, C, H, W)",
              f"normalise ({pp.normalize}): {NORMALIZATION[pp.normalize]}"]
    return "; ".join(f"{i + 1}. {s}" for i, s in enumerate(steps)) + "."


def reader_metadata(reader: Recognizer) -> dict:
    """The JSON-safe description an exported reader carries (see the module docstring)."""
    cs, pp = reader.charset, reader.preprocess
    meta = {k: reader.metadata[k] for k in KEPT if k in reader.metadata}
    head = getattr(reader, "head", "bce")
    meta.update({
        "task": "captcha", "head": head, "xpnet_version": __version__,
        "charset": cs.to_dict(), "length": cs.length, "n_classes": cs.n_classes,
        "preprocess": pp.to_dict(), "input_shape": list(pp.shape),
        "preprocessing": preprocessing_text(pp),
        "normalization": NORMALIZATION[pp.normalize],
        "input": {"name": "input", "shape": ["N", *pp.shape], "dtype": "float32"},
        "outputs": {"probabilities": ["N", cs.length, cs.n_classes], "logits": ["N", cs.length, cs.n_classes]},
        "decoding": DECODING,
    })
    if head == "ctc":
        shape = ["N", reader.steps, cs.n_classes + 1]
        meta.update({"outputs": {"probabilities": shape, "logits": shape}, "decoding": CTC_DECODING})
        if reader.lengths is not None:
            meta["lengths"] = list(reader.lengths)
    return meta


def export_reader(reader: Recognizer, path, opset: int = OPSET) -> Path:
    """Write ``reader`` (network + charset + preprocessing) as an ONNX file; returns the path."""
    if not isinstance(reader, Recognizer):
        raise UsageError(f"export_reader takes an xpnet.captcha.Recognizer, got {type(reader).__name__}: for a "
                         "plain network use xpnet.export_onnx(model, path).")
    if not hasattr(reader.model, "spec"):
        raise UsageError(f"the reader from {reader.path} is already an ONNX model: export the .npz it came from.")
    if getattr(reader, "head", "bce") == "ctc":
        return export_onnx(reader.model, path, metadata=reader_metadata(reader), head="ctc", opset=opset)
    return export_onnx(reader.model, path, length=reader.charset.length, metadata=reader_metadata(reader),
                       opset=opset)


def export_model_file(model_path, out_path, opset: int = OPSET) -> Path:
    """``xpnet export MODEL.npz OUT.onnx``: the reader in a model file as an ONNX file; returns the path."""
    model, meta = xio.load(model_path, to="numpy")
    missing = [k for k in ("charset", "preprocess") if k not in meta]
    if missing:
        raise ModelFileError(
            f"model file {model_path} is not a CAPTCHA reader (no {' or '.join(missing)} in its metadata), so it "
            "cannot be exported as one: export the bare network with xpnet.export_onnx(model, path), or train a "
            "reader with `xpnet train`.")
    try:
        reader = Recognizer(model, Charset.from_dict(meta["charset"]), Preprocess.from_dict(meta["preprocess"]), meta)
    except (TypeError, DataError) as exc:
        raise ModelFileError(f"model file {model_path} has malformed reader metadata ({one_line(exc)}).") from None
    reader.path = str(model_path)
    return export_reader(reader, out_path, opset)


__all__ = ["export_reader", "export_model_file", "reader_metadata", "preprocessing_text"]
