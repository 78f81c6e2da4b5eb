"""The compute types a model may be loaded in (`--compute_type`), in a module of their own
so that the command line's parser is built without importing torch."""

COMPUTE_TYPES = (
    "default",
    "auto",
    "float32",
    "float16",
    "bfloat16",
    "int8",
    "int8_float32",
    "int8_float16",
    "int8_bfloat16",
)
