"""GPU check: CPU-vs-CUDA agreement and half-precision throughput, on seeded random weights.

The real checkpoints do not fit the GPU machine's transfer limit, so the network is built
with seeded random weights of an official shape. Random weights decode nonsense; what is
checked is that CUDA computes what the CPU computes (and CUDA graphs what eager CUDA
computes), and how fast, against openai-whisper and Hugging Face transformers running the
same random network (each skipped with a note where it is not installed).

    python benchmarks/gpu_check.py [--shape large-v3] [--tokens 100] [--batch 1 8]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace

import torch

from susurrus.decoding import DecodingOptions, decode
from susurrus.model import ModelDimensions, Whisper
from susurrus.quantize import quantize_int8

SHAPES = {
    "tiny": ModelDimensions(80, 1500, 384, 6, 4, 51865, 448, 384, 6, 4),
    "base": ModelDimensions(80, 1500, 512, 8, 6, 51865, 448, 512, 8, 6),
    "large-v3": ModelDimensions(128, 1500, 1280, 20, 32, 51866, 448, 1280, 20, 32),
    "turbo": ModelDimensions(128, 1500, 1280, 20, 32, 51866, 448, 1280, 20, 4),
}


def random_model(dims: ModelDimensions, seed: int = 0, device: str = "cpu") -> Whisper:
    torch.manual_seed(seed)
    with torch.device(device):  # initialised where it runs: fast even for 1.5 B parameters
        model = Whisper(dims)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
            elif "ln" in name.split(".")[-2]:
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02 if p.ndim > 1 else 1.0)
    return model.to(device).eval()  # buffers made on the CPU (sinusoids) move too


def fixed_length_options(model: Whisper, tokens: int) -> DecodingOptions:
    """Never stop early: end-of-text is suppressed, so every window decodes `tokens` tokens."""
    eot = 50257 if model.is_multilingual else 50256
    return DecodingOptions(
        language="en",
        temperature=0.0,
        sample_len=tokens,
        suppress_tokens=[-1, eot],
        without_timestamps=True,
    )


def agreement(dims: ModelDimensions, tokens: int) -> dict:
    cpu = random_model(dims)
    gpu = random_model(dims).cuda()  # same seed, same CPU draws: the same weights
    mel = torch.randn(2, dims.n_mels, 3000, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        f_cpu = cpu.embed_audio(mel)
        f_gpu = gpu.embed_audio(mel.cuda()).cpu()
    options = fixed_length_options(cpu, tokens)
    out_cpu = decode(cpu, mel, options)
    out_gpu = decode(gpu, mel.cuda(), options)
    same = [a.tokens == b.tokens for a, b in zip(out_cpu, out_gpu)]
    prefix = [
        next((i for i, (x, y) in enumerate(zip(a.tokens, b.tokens)) if x != y), len(a.tokens))
        for a, b in zip(out_cpu, out_gpu)
    ]
    return {
        "encoder_max_abs_diff": float((f_cpu - f_gpu).abs().max()),
        "tokens_identical": same,
        "identical_prefix": prefix,
        "tokens": tokens,
    }


def graph_agreement(dims: ModelDimensions, tokens: int) -> dict:
    """Greedy and beam 5 with and without CUDA graphs, float16: the same tokens."""
    model = random_model(dims, device="cuda").half()
    mel = torch.randn(2, dims.n_mels, 3000, device="cuda")
    same = {}
    for beam in (None, 5):
        options = replace(fixed_length_options(model, tokens), beam_size=beam)
        out = {}
        for graphs in (True, False):
            model.cuda_graphs = graphs
            out[graphs] = [r.tokens for r in decode(model, mel, options)]
        same["beam5" if beam else "greedy"] = out[True] == out[False]
    # Cast after graphs were captured: the old graphs must not replay on freed weights.
    model.cuda_graphs = True
    before = [r.tokens for r in decode(model, mel, fixed_length_options(model, tokens))]
    model.float()
    graphed = [r.tokens for r in decode(model, mel, fixed_length_options(model, tokens))]
    model.cuda_graphs = False
    eager = [r.tokens for r in decode(model, mel, fixed_length_options(model, tokens))]
    same["after_float()"] = graphed == eager
    same["float16_vs_float32_identical"] = before == graphed
    return same


def throughput(
    dims: ModelDimensions,
    dtype: torch.dtype,
    batch: int,
    tokens: int,
    graphs: bool = True,
    int8: bool = False,
) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = random_model(dims, device="cuda")
    if int8:
        quantize_int8(model)
    model = model.to(dtype)
    model.cuda_graphs = graphs
    mel = torch.randn(batch, dims.n_mels, 3000, device="cuda")
    options = fixed_length_options(model, tokens)
    decode(model, mel, options)  # warm-up: kernels, allocator
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        model.embed_audio(mel.to(dtype))
    torch.cuda.synchronize()
    encode_s = time.perf_counter() - start
    start = time.perf_counter()
    results = decode(model, mel, options)
    torch.cuda.synchronize()
    total_s = time.perf_counter() - start
    n_tokens = sum(len(r.tokens) for r in results)
    return {
        "system": "susurrus" + ("" if graphs else " (eager)"),
        "dtype": ("int8_" if int8 else "") + str(dtype).replace("torch.", ""),
        "batch": batch,
        "encode_s": round(encode_s, 4),
        "decode_total_s": round(total_s, 4),
        "tokens": n_tokens,
        "tokens_per_s": round(n_tokens / (total_s - encode_s), 1),
        "windows_per_s": round(batch / total_s, 2),
        "audio_x_realtime": round(batch * 30 / total_s, 1),
        "peak_gpu_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),
    }


def openai_throughput(dims: ModelDimensions, batch: int, tokens: int) -> dict:
    """The same random network in openai-whisper (float16), greedy through whisper.decode."""
    import whisper
    from whisper.model import ModelDimensions as OpenAIDims
    from whisper.model import Whisper as OpenAIWhisper

    ours = random_model(dims, device="cuda")
    model = OpenAIWhisper(OpenAIDims(**asdict(dims))).cuda()
    model.load_state_dict(ours.state_dict())
    # As whisper.load_model leaves it: float32 weights, cast to float16 per call (fp16=True).
    model = model.eval()
    del ours
    eot = 50257 if dims.n_vocab >= 51865 else 50256
    options = whisper.DecodingOptions(
        language="en",
        temperature=0.0,
        sample_len=tokens,
        suppress_tokens=[-1, eot],
        without_timestamps=True,
        fp16=True,
    )
    mel = torch.randn(batch, dims.n_mels, 3000, device="cuda", dtype=torch.float16)
    whisper.decode(model, mel, options)
    torch.cuda.synchronize()
    start = time.perf_counter()
    results = whisper.decode(model, mel, options)
    torch.cuda.synchronize()
    total_s = time.perf_counter() - start
    return {
        "system": "openai-whisper",
        "dtype": "float16",
        "batch": batch,
        "decode_total_s": round(total_s, 4),
        "tokens": sum(len(r.tokens) for r in results),
        "windows_per_s": round(batch / total_s, 2),
        "audio_x_realtime": round(batch * 30 / total_s, 1),
    }


def hf_throughput(dims: ModelDimensions, dtype: torch.dtype, batch: int, tokens: int) -> dict:
    """The same random network in Hugging Face transformers, greedy through its generate()."""
    from transformers import GenerationMixin, WhisperConfig, WhisperForConditionalGeneration

    from susurrus.hf import hf_name

    config = WhisperConfig(
        d_model=dims.n_audio_state,
        encoder_layers=dims.n_audio_layer,
        encoder_attention_heads=dims.n_audio_head,
        encoder_ffn_dim=4 * dims.n_audio_state,
        decoder_layers=dims.n_text_layer,
        decoder_attention_heads=dims.n_text_head,
        decoder_ffn_dim=4 * dims.n_text_state,
        num_mel_bins=dims.n_mels,
        max_source_positions=dims.n_audio_ctx,
        max_target_positions=dims.n_text_ctx,
        vocab_size=dims.n_vocab,
        attn_implementation="sdpa",
    )
    ours = random_model(dims, device="cuda")
    with torch.device("cuda"):
        hf = WhisperForConditionalGeneration(config)
    state = {"model." + hf_name(k): v for k, v in ours.state_dict().items()}
    state["proj_out.weight"] = state["model.decoder.embed_tokens.weight"]
    missing, unexpected = hf.load_state_dict(state, strict=False)
    hf = hf.to("cuda", dtype).eval()
    mel = torch.randn(batch, dims.n_mels, 3000, device="cuda", dtype=dtype)
    start_ids = torch.tensor([[50258, 50259, 50360, 50364]] * batch, device="cuda")

    def run():
        # The generic generate(): whisper's own wrapper wants a real generation config.
        return GenerationMixin.generate(
            hf,
            input_features=mel,
            decoder_input_ids=start_ids,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            num_beams=1,
        )

    with torch.inference_mode():
        run()
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = run()
        torch.cuda.synchronize()
    total_s = time.perf_counter() - start
    return {
        "system": "transformers",
        "dtype": str(dtype).replace("torch.", ""),
        "batch": batch,
        "decode_total_s": round(total_s, 4),
        "tokens": int((out.shape[1] - start_ids.shape[1]) * batch),
        "windows_per_s": round(batch / total_s, 2),
        "audio_x_realtime": round(batch * 30 / total_s, 1),
        "unloaded": [len(missing), len(unexpected)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="large-v3", choices=SHAPES)
    parser.add_argument("--agreement-shape", default="tiny", choices=SHAPES)
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: nothing to check")
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    report["agreement"] = agreement(SHAPES[args.agreement_shape], 50)
    report["graphs_equal_eager"] = graph_agreement(SHAPES["base"], 50)
    print(json.dumps(report), flush=True)
    shape = SHAPES[args.shape]
    runs = []
    configs = [
        (torch.float16, True, False),
        (torch.float16, False, False),
        (torch.bfloat16, True, False),
        (torch.float16, True, True),
    ]
    for dtype, graphs, int8 in configs:
        for batch in args.batch:
            runs.append(throughput(shape, dtype, batch, args.tokens, graphs=graphs, int8=int8))
            print(json.dumps(runs[-1]), flush=True)
    for peer, name in ((openai_throughput, "openai-whisper"), (hf_throughput, "transformers")):
        for batch in args.batch:
            try:
                if peer is openai_throughput:
                    runs.append(peer(shape, batch, args.tokens))
                else:
                    runs.append(peer(shape, torch.float16, batch, args.tokens))
            except Exception as exc:  # a peer failing must not lose our numbers
                runs.append({"system": name, "error": repr(exc)[:300]})
            print(json.dumps(runs[-1]), flush=True)
    report["throughput"] = {"shape": args.shape, "runs": runs}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
