"""The names the library's enumerated settings take, defined once, in a module that imports nothing: the command line
builds its argument tables (``choices``, help) from them without importing torch, so that ``sequencer COMMAND
--help`` and a bad flag answer at once. The modules that act on a setting import its names from here."""

# data.loader: the resize interpolations of the transforms ("random": a random one per image, training only)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming", "random")
# engine.amp: autocast dtypes by the names runs record (AMP_DTYPES maps them to torch's dtypes)
AMP_DTYPE_NAMES = ("float32", "bfloat16", "float16")
# models.segmentation: the segmenters' decode heads
HEADS = ("upernet", "fpn")
# engine.segmentation_eval: whole-image or sliding-window evaluation
EVAL_MODES = ("whole", "slide")
# tools.erf: the paper's effective receptive field, or the gradient's magnitude
ERF_MODES = ("paper", "magnitude")
# tools.export: format -> the file suffixes that name it
EXPORT_FORMATS = {"onnx": (".onnx",), "torchscript": (".pt", ".ts", ".torchscript", ".jit"),
                  "safetensors": (".safetensors",), "exported-program": (".pt2",)}
MIN_OPSET = 17  # the oldest ONNX opset an export writes: LayerNormalization's
