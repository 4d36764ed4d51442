"""vLLM integration: the load format "weightd" and a worker extension for refit.

    pip install './client/python[vllm]'          # registers the plugin (entry point below)
    vllm serve /models/Llama-3-8B --tensor-parallel-size 2 --load-format weightd \\
        --model-loader-extra-config '{"socket": "/run/weightd/weightd.sock"}'

    llm = vllm.LLM(model=..., load_format="weightd",
                   worker_extension_cls="weightd.vllm.WeightdWorkerExtension")
    weightd.vllm.refresh(llm)                    # after `weightctl update`: newest generation

Discovery: the package declares the entry point `weightd = "weightd.vllm:register"` in the group
`vllm.general_plugins`; vLLM calls register() in every process (front end, engine core, each
worker) before it reads `--load-format`. `VLLM_PLUGINS` may restrict which plugins load.

The loader, in each worker (rank = the worker's tensor-parallel rank):
  1. names the model in the daemon: option "model", else `<dir>-<hash of its path>-tp<T>-<dtype>`
     (pipeline parallel 1; `-ep` with expert parallelism);
  2. when the daemon does not hold it, asks it to load the checkpoint (option "checkpoint", else
     vLLM's model directory) with tp = T and vLLM's dtype, and waits, logging progress; a second
     start finds it and only attaches;
  3. attaches its rank and binds every parameter of vLLM's freshly built model to the daemon's
     tensor of the same name, after checking that every parameter has one, with the same shape,
     dtype and device, and that the daemon serves nothing vLLM lacks (else: ValueError naming
     each difference, both shapes, and the option or recipe to use; never a silent fallback);
  4. runs vLLM's own process_weights_after_loading.

Zero-copy and not: a parameter aliases the daemon's read-only memory (param.data = attached
tensor) when vLLM's post-load processing only reads it. Parameters of layers whose processing
may write into them in place get memory of their own first (a clone): fused-MoE experts
(UnquantizedFusedMoEMethod copies the weights back into themselves and the CPU backend prepacks
them), attention layers, any quantized method, and whatever the option "clone" names. Processing
that derives new tensors (on CPU every linear layer is repacked for oneDNN and its weight
replaced by an empty tensor; the lm_head is packed too) costs that memory in any case, as it does
with vLLM's own loader. On CUDA, unquantized linear layers, embeddings and norms stay zero-copy.

Refit: after the daemon publishes a new generation (`weightctl update`, Client.update), the
worker extension's `weightd_refresh()` (through LLM.collective_rpc; `refresh(llm)` below does it
and resets the prefix cache) calls Attachment.refresh(), which maps the new bytes at the same
addresses, so aliased parameters show them at once; then, for every layer whose processing
derived or rewrote tensors, it rebinds the layer's pre-processing parameters (aliases, or fresh
clones of the new bytes) and runs that layer's processing again, copying the results into the
tensors the model already holds where shapes match (addresses kept for CUDA graphs). vLLM's
loaders do not run again.
"""
import hashlib
import os
import time

import torch

import vllm
from vllm.distributed import (get_pp_group, get_tensor_model_parallel_rank,
                              get_tensor_model_parallel_world_size)
from vllm.logger import init_logger
from vllm.model_executor.model_loader import register_model_loader
from vllm.model_executor.model_loader.base_loader import BaseModelLoader

from . import _client
from ._errors import AlreadyExistsError, NotFoundError, WeightdError

# Under "vllm." so that vLLM's logging configuration (format, level) applies.
logger = init_logger("vllm.plugins.weightd")

LOAD_FORMAT = "weightd"

# model_loader_extra_config keys (the README's table says what each does).
_OPTIONS = {
    "socket": None,          # daemon socket; None: $WEIGHTD_SOCKET, then the defaults
    "model": None,           # the model's name in the daemon; None: derived (see _model_name)
    "checkpoint": None,      # directory the daemon loads; None: vLLM's model directory
    "load": True,            # ask the daemon to load a model it lacks (False: fail instead)
    "load_timeout": 3600.0,  # seconds to wait for that load
    "recipe": None,          # passed to the daemon's load: built-in recipe name
    "recipe_file": None,     # ... or a recipe file the daemon can read
    "skip": None,            # ... extra skip substrings
    "clone": (),             # substrings: matching parameters get their own memory
    "alias": (),             # substrings: matching parameters alias the daemon even in layers
                             # whose processing may write (a write then faults): for backends
                             # known to only read them (vLLM 0.32's CPU fused MoE: tested)
}

# Quantization methods whose process_weights_after_loading never writes into the layer's
# loaded tensors: on CPU they pack a copy (dispatch_cpu_unquantized_gemm) and rebind the bias's
# .data; elsewhere they do nothing (vllm/model_executor/layers/linear.py,
# vocab_parallel_embedding.py). Parameters of other methods are cloned before processing.
_READ_ONLY_METHODS = frozenset({"UnquantizedLinearMethod", "UnquantizedEmbeddingMethod"})

# vLLM >= 0.30 nests fused-MoE experts in a RoutedExperts module; the built-in recipes name the
# stacked expert tensors as vLLM did before (`...experts.w13_weight`). Same bytes, same shapes.
_ROUTED_EXPERTS = ".routed_experts."

_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}

_registered = False


def register():
    """The `vllm.general_plugins` entry point: registers the load format "weightd". vLLM may call
    it several times per process; only the first registers."""
    global _registered
    if _registered:
        return
    _registered = True
    register_model_loader(LOAD_FORMAT)(WeightdModelLoader)


def refresh(llm, reset_prefix_cache=True):
    """Moves every worker of `llm` (a vllm.LLM started with
    worker_extension_cls="weightd.vllm.WeightdWorkerExtension") to the daemon's newest generation
    and, when any moved, resets the prefix cache (its KV blocks were computed with the old
    weights). Returns the per-worker reports (see WeightdWorkerExtension.weightd_refresh)."""
    reports = llm.collective_rpc("weightd_refresh")
    if reset_prefix_cache and any(r["changed"] for r in reports):
        llm.reset_prefix_cache()
    return reports


class WeightdWorkerExtension:
    """Mixed into vLLM's worker class by `--worker-extension-cls
    weightd.vllm.WeightdWorkerExtension`; its methods are called with collective_rpc, on each
    worker's own thread between steps."""

    def _weightd_state(self):
        model = self.get_model() if hasattr(self, "get_model") else self.model_runner.model
        state = getattr(model, "_weightd_state", None)
        if state is None:
            raise RuntimeError("this worker's model was not loaded with --load-format weightd")
        return state

    def weightd_generation(self):
        """The generation this worker's weights show."""
        return self._weightd_state().attachment.generation

    def weightd_info(self):
        """{rank, model, generation, zero_copy, cloned, zero_copy_bytes, cloned_bytes}: what this
        worker's load bound, counted per daemon tensor."""
        st = self._weightd_state()
        return {"rank": st.rank, "model": st.name, "generation": st.attachment.generation,
                "zero_copy": st.n_alias, "cloned": st.n_clone,
                "zero_copy_bytes": st.alias_bytes, "cloned_bytes": st.clone_bytes}

    def weightd_refresh(self):
        """Moves this worker's weights to the daemon's newest generation, in place. Returns
        {rank, generation, changed, reprocessed (layers whose processing ran again), seconds}.
        Raises what Attachment.refresh raises (the old generation stays mapped)."""
        return self._weightd_state().refresh()


class WeightdModelLoader(BaseModelLoader):
    """The load format "weightd" (module docstring). One instance per load; the state needed for
    refit lives on the model (`model._weightd_state`)."""

    def __init__(self, load_config):
        super().__init__(load_config)
        extra = dict(load_config.model_loader_extra_config or {})
        unknown = sorted(set(extra) - set(_OPTIONS))
        if unknown:
            raise ValueError(f"--model-loader-extra-config: unknown key(s) {unknown} for "
                             f"--load-format {LOAD_FORMAT}; valid keys: {sorted(_OPTIONS)}")
        self.options = {**_OPTIONS, **extra}
        for key in ("clone", "alias"):
            v = self.options[key]
            self.options[key] = (v,) if isinstance(v, str) else tuple(v)
        self._expert_parallel = False

    def download_model(self, model_config):
        pass  # the daemon reads the checkpoint; it must be a directory it can read

    def get_external_weight_memory(self, vllm_config):
        # Only the CUDA worker asks: bytes of this rank's daemon arena, which lives on the GPU
        # outside torch's allocator, when the model is resident already (else 0: the load has
        # not happened yet and vLLM's profiling sees it as used memory).
        try:
            name = self._model_name(vllm_config.model_config, vllm_config)
            rank = get_tensor_model_parallel_rank()
            with _client.Client(self.options["socket"]) as c:
                st = c.status(name)
            if st["state"] != "ready" or st["backend"] != "cuda":
                return 0
            return sum(r["arena_bytes"] for r in st["ranks"] if r["rank"] == rank)
        except (WeightdError, OSError):
            return 0

    def load_model(self, vllm_config, model_config, prefix=""):
        self._expert_parallel = bool(vllm_config.parallel_config.enable_expert_parallel)
        self._vllm_config = vllm_config
        return super().load_model(vllm_config, model_config, prefix)

    def load_weights(self, model, model_config):
        """Attaches this worker's rank and binds every parameter of `model` to it (replacing any
        earlier binding)."""
        state = getattr(model, "_weightd_state", None)
        if state is not None:
            # BaseModelLoader.load_weights's other use, an in-place reload of a model this
            # loader bound already: the newest generation, in place, as weightd_refresh does.
            state.refresh()
            return
        if get_pp_group().world_size != 1:
            raise ValueError("--load-format weightd serves pipeline-parallel size 1 only "
                             f"(got {get_pp_group().world_size})")
        t0 = time.monotonic()
        tp = get_tensor_model_parallel_world_size()
        rank = get_tensor_model_parallel_rank()
        name = self._model_name(model_config, getattr(self, "_vllm_config", None))
        client = _client.Client(self.options["socket"])
        try:
            self._ensure_loaded(client, name, model_config, tp)
            attachment = client.attach(name, rank, backend="torch")
            st = client.status(name)
        finally:
            client.close()
        if st["tp"] != tp:
            raise ValueError(f"weightd: the daemon's model '{name}' has tp={st['tp']}, vLLM runs "
                             f"tensor-parallel size {tp}: use another model name "
                             "(--model-loader-extra-config '{\"model\": ...}') or unload it "
                             f"(weightctl unload {name})")
        state = _State(name, rank, attachment, self.options["clone"], self.options["alias"],
                       model_config)
        state.bind(model)
        model._weightd_state = state
        logger.info("weightd: rank %d attached '%s' generation %d in %.3f s: %d parameters "
                    "zero-copy (%.1f MiB), %d cloned (%.1f MiB)", rank, name,
                    attachment.generation, time.monotonic() - t0, state.n_alias,
                    state.alias_bytes / 2**20, state.n_clone, state.clone_bytes / 2**20)

    # ---- helpers ----

    def _model_name(self, model_config, vllm_config):
        if self.options["model"]:
            return self.options["model"]
        path = os.path.realpath(self.options["checkpoint"] or model_config.model)
        dtype = _DTYPE_NAMES.get(model_config.dtype, str(model_config.dtype).replace("torch.", ""))
        tp = (vllm_config.parallel_config.tensor_parallel_size if vllm_config is not None
              else get_tensor_model_parallel_world_size())
        ep = vllm_config is not None and vllm_config.parallel_config.enable_expert_parallel
        digest = hashlib.sha256(path.encode()).hexdigest()[:8]
        return f"{os.path.basename(path)}-{digest}-tp{tp}-{dtype}{'-ep' if ep else ''}"

    def _ensure_loaded(self, client, name, model_config, tp):
        """Returns once the daemon's model `name` is ready, loading it first if absent."""
        opts = self.options
        checkpoint = os.path.realpath(opts["checkpoint"] or model_config.model)
        try:
            st = client.status(name)
        except NotFoundError:
            if not opts["load"]:
                raise ValueError(f"weightd: the daemon holds no model '{name}' and the option "
                                 "\"load\" is false: load it first (weightctl load "
                                 f"{name} {checkpoint} --tp {tp})") from None
            if not os.path.isdir(checkpoint):
                raise ValueError(f"weightd: '{checkpoint}' is not a directory; the daemon loads "
                                 "a local checkpoint directory: pass it as \"checkpoint\" in "
                                 "--model-loader-extra-config") from None
            dtype = _DTYPE_NAMES.get(model_config.dtype)
            if dtype is None:
                raise ValueError(f"weightd: vLLM's dtype {model_config.dtype} has no weightd "
                                 "equivalent (bf16, fp16, fp32)") from None
            try:
                client.load(name, checkpoint, tp=tp, dtype=dtype, recipe=opts["recipe"],
                            recipe_file=opts["recipe_file"], skip=opts["skip"],
                            expert_parallel=self._expert_parallel)
                logger.info("weightd: loading '%s' from %s (tp=%d, %s)", name, checkpoint, tp,
                            dtype)
            except AlreadyExistsError:
                pass  # another rank (or process) started it first
            st = client.status(name)
        deadline = time.monotonic() + float(opts["load_timeout"])
        last_log = 0.0
        while st["state"] != "ready":
            if st["state"] == "failed":
                raise ValueError(f"weightd: the daemon failed to load '{name}': "
                                 f"{st.get('error', '')} (unload it with weightctl unload {name}, "
                                 "fix the cause, start again)")
            now = time.monotonic()
            if now > deadline:
                raise TimeoutError(f"weightd: '{name}' not ready after {opts['load_timeout']} s "
                                   f"({st['bytes_done']} of {st['bytes_total']} bytes)")
            if now - last_log >= 2.0:
                total = st["bytes_total"] or 1
                logger.info("weightd: '%s' %s: %.2f of %.2f GB (%.0f%%), %.1f s", name,
                            st["state"], st["bytes_done"] / 1e9, st["bytes_total"] / 1e9,
                            100.0 * st["bytes_done"] / total, st.get("seconds", 0.0))
                last_log = now
            time.sleep(0.05)
            st = client.status(name)


class _Group:
    """One daemon tensor and the vLLM parameter bound to it, with every (module, leaf) that
    holds that parameter (a tied lm_head holds embed_tokens' weight)."""

    __slots__ = ("name", "source", "param", "attrs", "cloned", "owners")

    def __init__(self, name, source, param, cloned, owners):
        self.name = name
        self.source = source
        self.param = param
        # The attributes vLLM set on the parameter (weight_loader, output_dim, ...), as they
        # were before processing, for the fresh parameters a refit builds.
        self.attrs = dict(param.__dict__)
        self.cloned = cloned
        self.owners = owners  # [(module, leaf)]

    def fresh_parameter(self):
        data = self.source.clone() if self.cloned else self.source
        p = torch.nn.Parameter(data, requires_grad=False)
        p.__class__ = self.param.__class__
        p.__dict__.update(self.attrs)
        return p


class _State:
    """What a worker keeps after a weightd load: the attachment (its tensors hold the lease) and
    the bindings. Used from the worker's thread only."""

    def __init__(self, name, rank, attachment, clone_patterns, alias_patterns, model_config):
        self.name = name
        self.rank = rank
        self.attachment = attachment
        self.clone_patterns = clone_patterns
        self.alias_patterns = alias_patterns
        self.model_config = model_config
        self.groups = []
        self.modules = []  # modules holding a bound parameter, in named_modules order
        self.daemon_ptrs = set()
        self.n_alias = self.n_clone = self.alias_bytes = self.clone_bytes = 0

    def _needs_clone(self, name, module):
        if any(s in name for s in self.clone_patterns):
            return True
        if any(s in name for s in self.alias_patterns):
            return False
        if _is_deferred_attention(module):
            return True
        method = getattr(module, "quant_method", None)
        return method is not None and type(method).__name__ not in _READ_ONLY_METHODS

    @torch.no_grad()
    def bind(self, model):
        served = dict(self.attachment)
        modules = dict(model.named_modules(remove_duplicate=False))
        by_param = {}  # id(param) -> [names]
        params = {}
        for vname, param in model.named_parameters(remove_duplicate=False):
            if id(param) not in by_param:
                by_param[id(param)] = []
                params[id(param)] = param
            by_param[id(param)].append(vname)
        used, missing, wrong, plan = set(), [], [], []
        for pid, names in by_param.items():
            param = params[pid]
            found = [(v, d) for v in names for d in [_daemon_name(v, served)] if d is not None]
            if not found:
                missing.append(names[0])
                continue
            vname, dname = found[0]
            used.update(d for _, d in found)
            t = served[dname]
            if tuple(t.shape) != tuple(param.shape) or t.dtype != param.dtype:
                wrong.append(f"'{vname}': daemon '{dname}' {list(t.shape)} {_dt(t.dtype)}, "
                             f"vLLM {list(param.shape)} {_dt(param.dtype)}")
                continue
            if t.device != param.device:
                wrong.append(f"'{vname}': daemon tensor on {t.device}, vLLM's parameter on "
                             f"{param.device} (the daemon's backend and devices must match the "
                             "workers': load the model with devices = the workers' GPUs)")
                continue
            plan.append((names, dname, param, t))
        extra = sorted(set(served) - used)
        if missing or wrong or extra:
            raise ValueError(_mismatch_message(self.name, self.rank, type(model).__name__,
                                               missing, wrong, extra, served))
        seen = set()
        for names, dname, param, t in plan:
            owners = []
            for vname in names:
                module_name, _, leaf = vname.rpartition(".")
                owners.append((modules[module_name], leaf))
            cloned = any(self._needs_clone(v, m) for v, (m, _) in zip(names, owners))
            param.data = t.clone() if cloned else t
            self.groups.append(_Group(dname, t, param, cloned, owners))
            self.daemon_ptrs.add(t.data_ptr())
            for m, _ in owners:
                seen.add(id(m))
            nbytes = t.numel() * t.element_size()
            if cloned:
                self.n_clone += 1
                self.clone_bytes += nbytes
            else:
                self.n_alias += 1
                self.alias_bytes += nbytes
        self.modules = [m for _, m in model.named_modules() if id(m) in seen]

    @torch.no_grad()
    def refresh(self):
        t0 = time.monotonic()
        changed = self.attachment.refresh()
        reprocessed = 0
        if changed:
            reprocessed = self._reprocess()
        return {"rank": self.rank, "generation": self.attachment.generation, "changed": changed,
                "reprocessed": reprocessed, "seconds": time.monotonic() - t0}

    def _reprocess(self):
        """Runs the post-load processing of every bound layer that has one again, on the new
        generation's bytes, as vLLM's process_weights_after_loading orders it (quantization
        methods, then attention layers). Returns the number of layers processed."""
        from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase

        def has_method(m):
            return isinstance(getattr(m, "quant_method", None), QuantizeMethodBase)

        todo = [m for m in self.modules if has_method(m) or _is_deferred_attention(m)]
        todo_ids = {id(m) for m in todo}
        kernel = {id(m): (dict(m._parameters), dict(m._buffers)) for m in todo}
        for g in self.groups:
            if any(id(m) in todo_ids for m, _ in g.owners):
                fresh = g.fresh_parameter()
                for m, leaf in g.owners:
                    m._parameters[leaf] = fresh
            elif g.cloned:
                g.param.data.copy_(g.source)
        for m in todo:
            if not has_method(m):
                continue
            method = m.quant_method
            # The fused-MoE methods build their kernel (and, on CPU, prepack the experts) only on
            # the first call; a later call takes the "weight update" path, which expects weights
            # in kernel format already. These are checkpoint-format weights: first-call path.
            if getattr(method, "moe_kernel", None) is not None:
                method.moe_kernel = None
            if hasattr(m, "_already_called_process_weights_after_loading"):
                delattr(m, "_already_called_process_weights_after_loading")
            method.process_weights_after_loading(m)
            if hasattr(m, "update_param_tp_status"):
                m.update_param_tp_status()
        for m in todo:
            if _is_deferred_attention(m):
                m.process_weights_after_loading(self.model_config.dtype)
        # Keep the tensors the model held (and their addresses, which CUDA graphs captured)
        # wherever a result fits them; elsewhere the new tensors stand.
        for m in todo:
            old_params, old_buffers = kernel[id(m)]
            for table, olds in ((m._parameters, old_params), (m._buffers, old_buffers)):
                for leaf, old in olds.items():
                    new = table.get(leaf)
                    if old is None or new is None or new is old:
                        continue
                    if _fits(old, new) and old.data_ptr() not in self.daemon_ptrs:
                        old.data.copy_(new.data)
                        table[leaf] = old
        return len(todo)


def _is_deferred_attention(module):
    from vllm.model_executor.layers.attention import is_deferred_attention_layer
    return is_deferred_attention_layer(module)


def _fits(old, new):
    return (old.shape == new.shape and old.dtype == new.dtype and old.device == new.device
            and old.stride() == new.stride() and old.numel() > 0)


def _daemon_name(vname, served):
    if vname in served:
        return vname
    if _ROUTED_EXPERTS in vname:
        alt = vname.replace(_ROUTED_EXPERTS, ".", 1)
        if alt in served:
            return alt
    return None


def _dt(dtype):
    return str(dtype).replace("torch.", "")


def _nearest(name, names, n=3):
    import difflib
    return difflib.get_close_matches(name, names, n=n, cutoff=0.5)


def _mismatch_message(name, rank, arch, missing, wrong, extra, served, limit=12):
    lines = [f"weightd: the daemon's model '{name}' (rank {rank}) does not match vLLM's "
             f"{arch} (vLLM {vllm.__version__}); nothing was loaded:"]
    for w in wrong[:limit]:
        lines.append(f"  shape/dtype: {w}")
    for m in missing[:limit]:
        near = _nearest(m, list(served))
        lines.append(f"  missing: vLLM parameter '{m}' has no daemon tensor"
                     + (f" (nearest: {', '.join(near)})" if near else ""))
    for e in extra[:limit]:
        lines.append(f"  extra: the daemon serves '{e}', which vLLM's model lacks")
    hidden = max(0, len(wrong) - limit) + max(0, len(missing) - limit) + max(0, len(extra) - limit)
    if hidden:
        lines.append(f"  ... and {hidden} more")
    lines.append("  The daemon's recipe decides names, fusion and shapes: pass \"recipe\" or "
                 "\"recipe_file\" (docs/RECIPES.md) and \"skip\" in --model-loader-extra-config, "
                 f"or a model loaded with matching tp/dtype (\"model\"); then `weightctl unload "
                 f"{name}` so that the loader loads it again.")
    return "\n".join(lines)


__all__ = ["LOAD_FORMAT", "WeightdModelLoader", "WeightdWorkerExtension", "refresh", "register"]
