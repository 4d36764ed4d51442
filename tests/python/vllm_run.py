"""Runs the real vLLM once, for test_vllm_loader.py: `python vllm_run.py JOB.json RESULT.json`.

JOB: {"model": checkpoint dir, "load_format": "auto" | "weightd" | "weightd_capture",
      "extra": model_loader_extra_config, "tp": T, "prompts": [[token ids]], "max_tokens": n,
      "extension": true to start with weightd.vllm.WeightdWorkerExtension,
      "refit": {"checkpoint": dir B, "socket": path}  (optional: after the first generation,
               `update` the daemon's model to B, refresh every worker, generate again)}
RESULT: {"runs": [{"tokens": [[ids]], "logprobs": [[float]]}, ...], "info": [per-worker
         weightd_info], "refresh": [per-worker reports], "seconds": {"start": s, "generate": s}}

Greedy decoding (temperature 0), logprobs of the sampled tokens, CPU, bfloat16, eager mode.
Each run is a fresh process because vLLM keeps process-wide state (plugins, distributed groups).
"""
import json
import sys
import time


def generate(llm, prompts, max_tokens):
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=1, detokenize=False,
                        ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    run = {"tokens": [], "logprobs": []}
    for o in outs:
        c = o.outputs[0]
        run["tokens"].append(list(c.token_ids))
        run["logprobs"].append([lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)])
    return run


def main(job_path, result_path):
    with open(job_path) as f:
        job = json.load(f)
    t0 = time.monotonic()
    from vllm import LLM

    kwargs = {}
    if job.get("extension"):
        kwargs["worker_extension_cls"] = "weightd.vllm.WeightdWorkerExtension"
    llm = LLM(model=job["model"], skip_tokenizer_init=True, dtype="bfloat16", enforce_eager=True,
              tensor_parallel_size=job.get("tp", 1), max_model_len=256,
              kv_cache_memory_bytes=128 << 20, load_format=job.get("load_format", "auto"),
              model_loader_extra_config=job.get("extra") or {}, seed=0, **kwargs)
    t1 = time.monotonic()
    result = {"runs": [generate(llm, job["prompts"], job.get("max_tokens", 16))
                       for _ in range(job.get("repeat", 1))]}
    t2 = time.monotonic()
    if job.get("extension"):
        result["info"] = llm.collective_rpc("weightd_info")
    refit = job.get("refit")
    if refit:
        import weightd
        import weightd.vllm

        name = result["info"][0]["model"]
        with weightd.Client(refit.get("socket")) as c:
            result["update"] = c.update(name, refit["checkpoint"], wait=True)
        t3 = time.monotonic()
        result["refresh"] = weightd.vllm.refresh(llm)
        result["refresh_seconds"] = time.monotonic() - t3
        for _ in range(refit.get("generations", 1)):
            result["runs"].append(generate(llm, job["prompts"], job.get("max_tokens", 16)))
        result["info_after"] = llm.collective_rpc("weightd_info")
    result["seconds"] = {"start": t1 - t0, "generate": t2 - t1}
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
