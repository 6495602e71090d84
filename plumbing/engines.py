"""Sampling engines with the same calls for transformers and vLLM:
engine = make_engine(...); engine.push_weights(model); engine.generate(prompt_ids, n, ...)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from plumbing.cli import DataError
from plumbing.distributed import autocast, full_weights
from plumbing.models import context_length, load_tokenizer


def choose_backend(requested: str) -> str:
    """--backend vllm | hf | auto (vLLM when importable and a CUDA GPU is present: on a CPU its
    per-step overhead makes it slower than generate() for small models)."""
    if requested not in ("auto", "vllm", "hf"):
        raise DataError(f"--backend must be auto, vllm or hf, got {requested!r}")
    if requested == "hf" or (requested == "auto" and not torch.cuda.is_available()):
        return "hf"
    try:
        import vllm  # noqa: F401
    except ImportError as error:  # a broken vLLM must not silently become generate()
        raise DataError(
            f"--backend {requested}: vLLM cannot be imported ({error}); run "
            "'bash install.sh', or pass --backend hf"
        ) from None
    return "vllm"


def stop_token_ids(tokenizer, generation_config) -> set[int]:
    """The one stop-token rule: the tokenizer's EOS plus the generation config's EOS ids (e.g.
    Qwen2.5-Instruct: <|im_end|> and <|endoftext|>)."""
    configured = getattr(generation_config, "eos_token_id", None)
    configured = [configured] if isinstance(configured, int) else list(configured or [])
    return {tokenizer.eos_token_id, *configured}


def clean_response(token_ids: list[int], stop_ids: set[int], pad_token_id: int | None) -> list[int]:
    """A generated sequence up to and including its first stop token, without pad tokens."""
    response = []
    for token in token_ids:
        if token in stop_ids:
            return response + [token]
        if token != pad_token_id:
            response.append(token)
    return response


class SeededSampling:
    """A generate() logits processor that makes its argmax a sample: temperature, top-p, then the
    Gumbel-max trick, argmax(log p + G) ~ p with G = -log E, E ~ Exp(1), each row's E drawn from its
    own generator, so that a row's samples do not depend on the rows beside it."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float, device):
        from transformers import TemperatureLogitsWarper, TopPLogitsWarper

        self.generators = [torch.Generator(device).manual_seed(seed) for seed in seeds]
        self.warpers = [TemperatureLogitsWarper(temperature)]
        self.warpers += [TopPLogitsWarper(top_p)] if top_p < 1 else []

    def __call__(self, input_ids, scores):
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        noise = torch.empty_like(scores)
        for row, generator in zip(noise, self.generators):
            row.exponential_(generator=generator)
        return scores - noise.log()


class TransformersEngine:
    """transformers generate() on the trainer's own model, or (trainer sharded) on a whole copy that
    receives its weights."""

    def __init__(self, model, tokenizer, batch_sequences: int):
        self.model, self.tokenizer, self.batch_sequences = model, tokenizer, batch_sequences
        self.stop_ids = stop_token_ids(tokenizer, model.generation_config)
        self.context = context_length(model.config)

    def push_weights(self, model) -> None:
        if model is not self.model:
            self.model.load_state_dict(dict(full_weights(model)))

    def release_memory(self, keep_weights: bool) -> None:
        pass

    def close(self) -> None:
        pass

    @torch.no_grad()
    def generate(
        self, prompt_ids, n, temperature, top_p, max_new_tokens, seeds=None, progress=None
    ):
        """n responses per prompt (temperature 0: greedy), stop token kept, no padding. Sampled,
        response j of prompt i is seeded seeds[i] + j (as vLLM seeds it), whatever the batch."""
        model, pad = self.model, self.tokenizer.pad_token_id
        device, was_training = next(model.parameters()).device, model.training
        model.eval()  # the KV cache (gradient checkpointing turns it off in train mode)
        # greedy argmax, of the logits or (sampling) of SeededSampling's; no options from the
        # model's generation_config.json (Qwen2.5's repetition penalty 1.05) act on it
        sampling = dict(do_sample=False, repetition_penalty=1.0, no_repeat_ngram_size=0)
        rows = [ids for ids in prompt_ids for _ in range(n)]  # prompt 0's n copies, then 1's, ...
        row_seeds = [seed + j for seed in seeds for j in range(n)] if temperature > 0 else None
        flat = []
        for start in range(0, len(rows), self.batch_sequences):
            batch = rows[start : start + self.batch_sequences]
            width = max(len(r) for r in batch)
            input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in batch], device=device)
            lengths = torch.tensor([len(r) for r in batch], device=device)[:, None]
            mask = (torch.arange(width, device=device)[None, :] >= width - lengths).long()
            max_new = min(max_new_tokens, (self.context or width + max_new_tokens) - width)
            sampling |= dict(
                max_new_tokens=max_new, pad_token_id=pad, eos_token_id=sorted(self.stop_ids)
            )
            if row_seeds:
                seeds_here = row_seeds[start : start + len(batch)]
                sampling["logits_processor"] = [
                    SeededSampling(seeds_here, temperature, top_p, device)
                ]
            with autocast(device):
                output = model.generate(input_ids=input_ids, attention_mask=mask, **sampling)
            flat += [clean_response(r, self.stop_ids, pad) for r in output[:, width:].tolist()]
            report_progress(progress, flat[-len(batch) :])
        model.train(was_training)
        return [flat[i * n : (i + 1) * n] for i in range(len(prompt_ids))]


class VLLMEngine:
    """A vLLM engine in this process (one per torchrun rank, data parallel, as TRL's colocate mode),
    fed with token ids; the trainer's weights are pushed into it."""

    def __init__(self, model_path: str, seed: int, max_model_len=None, **options):
        """options: gpu_memory_utilization (0.6), kv_cache_gib (0: by the share), enforce_eager."""
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in this process: weights can be pushed
        from transformers import GenerationConfig
        from vllm import LLM

        try:
            generation_config = GenerationConfig.from_pretrained(model_path)
        except OSError:  # no generation_config.json: the tokenizer's EOS is the only stop token
            generation_config = None
        self.stop_ids = stop_token_ids(load_tokenizer(model_path), generation_config)
        self.sleep_mode, self.asleep = torch.cuda.is_available(), False  # sleep mode: CUDA only
        kv_cache_bytes = int(options.get("kv_cache_gib", 0) * 2**30) or None
        rank = dist.get_rank() if dist.is_initialized() else 0  # the engine's own RNG: per rank
        engine_args = dict(
            model=model_path, tokenizer=model_path, seed=seed + rank, dtype="float32"
        )
        engine_args |= dict(max_model_len=max_model_len, enable_prefix_caching=False)
        engine_args |= dict(enforce_eager=options.get("enforce_eager", False))
        engine_args |= dict(enable_sleep_mode=self.sleep_mode, kv_cache_memory_bytes=kv_cache_bytes)
        if torch.cuda.is_available():
            engine_args["dtype"] = "bfloat16"
            engine_args["gpu_memory_utilization"] = options.get("gpu_memory_utilization", 0.6)
        else:  # no chunked prefill: a prefill split over two steps rewinds the seeded request's
            # generator, which a CPU generator cannot ("CPU Generator does not use offset", 0.32)
            engine_args["enable_chunked_prefill"] = False
            engine_args["kv_cache_memory_bytes"] = kv_cache_bytes or 2**30  # no share: 1 GiB
        if dist.is_initialized() and dist.get_world_size() > 1:
            engine_args["distributed_executor_backend"] = "external_launcher"
        self.llm = LLM(**engine_args)

    def release_memory(self, keep_weights: bool) -> None:
        """Sleep (CUDA): keep_weights offloads them to CPU (level 1), else discards them (2)."""
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=1 if keep_weights else 2)
            self.asleep = True

    def close(self) -> None:
        """Shut the engine down before the process group goes: its teardown leaves vLLM's groups,
        and one left after the group is gone prints a traceback at exit."""
        self.llm.llm_engine.engine_core.shutdown()

    def wake_up(self, tags: list[str] | None = None) -> None:
        if self.asleep:
            self.llm.wake_up(tags=tags)
            self.asleep = tags is not None and "kv_cache" not in tags

    def push_weights(self, model) -> None:
        """The trainer's weights into the engine (vLLM's loader reads transformers names); from
        sleep, the weights wake first and the KV cache after, so the two never peak together."""
        self.wake_up(["weights"])
        weights = {"weights_iterator": full_weights(model), "is_checkpoint_format": True}
        self.llm.collective_rpc("reload_weights", kwargs=weights)
        self.wake_up(["kv_cache"])

    def generate(
        self, prompt_ids, n, temperature, top_p, max_new_tokens, seeds=None, progress=None
    ):
        """n responses per prompt. Sampled, prompt i is a request seeded seeds[i]; vLLM seeds its
        j-th sample seeds[i] + j (v1/engine/parallel_sampling.py) and draws it from that seed alone
        (CPU: a generator per request; CUDA: Gumbel noise keyed on it), whatever the batch."""
        from vllm import SamplingParams, TokensPrompt

        self.wake_up()
        options = dict(n=n, temperature=temperature, top_p=top_p if temperature > 0 else 1.0)
        options |= dict(max_tokens=max_new_tokens, skip_special_tokens=False)
        seeds = seeds if temperature > 0 else [None] * len(prompt_ids)
        params = [SamplingParams(**options, seed=seed) for seed in seeds]
        prompts = [TokensPrompt(prompt_token_ids=p) for p in prompt_ids]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        groups = [[list(sample.token_ids) for sample in output.outputs] for output in outputs]
        groups = [[clean_response(r, self.stop_ids, None) for r in group] for group in groups]
        report_progress(progress, [r for group in groups for r in group])
        return groups


def report_progress(progress, responses: list[list[int]]) -> None:
    """Move a tqdm bar that counts responses; show the generated tokens per second so far."""
    if progress is None:
        return
    progress.tokens = getattr(progress, "tokens", 0) + sum(len(r) for r in responses)
    progress.update(len(responses))
    elapsed = progress.format_dict["elapsed"]
    progress.set_postfix(tokens_per_s=f"{progress.tokens / elapsed:.0f}" if elapsed else "-")


def make_engine(backend, model, tokenizer, model_path, *, seed, hf_batch_sequences, **vllm_args):
    """ "hf" samples from `model`; "vllm" loads `model_path` into its own engine."""
    if backend == "vllm":
        return VLLMEngine(model_path, seed, **vllm_args)
    return TransformersEngine(model, tokenizer, hf_batch_sequences)
