"""A vLLM plugin for the tests: the load format "weightd_capture" is vLLM's own default loader
that, after loading the checkpoint and before process_weights_after_loading (which repacks the
linear weights on CPU), saves every parameter of the rank to
$WEIGHTD_VLLM_CAPTURE_DIR/rank-{r}.safetensors under vLLM's parameter names.

test_vllm_loader.py makes it discoverable in every vLLM process through a temporary
`*.dist-info/entry_points.txt` (group vllm.general_plugins) on PYTHONPATH.
"""
import os


def register():
    from vllm.distributed import get_tensor_model_parallel_rank
    from vllm.model_executor.model_loader import DefaultModelLoader, register_model_loader

    class CaptureLoader(DefaultModelLoader):
        def load_weights(self, model, model_config):
            super().load_weights(model, model_config)
            from safetensors.torch import save_file

            out = os.environ["WEIGHTD_VLLM_CAPTURE_DIR"]
            os.makedirs(out, exist_ok=True)
            tensors = {n: p.detach().cpu().contiguous().clone()
                       for n, p in model.named_parameters()}
            save_file(tensors, os.path.join(out, f"rank-{get_tensor_model_parallel_rank()}"
                                                 ".safetensors"))

        def __init__(self, load_config):
            import dataclasses

            super().__init__(dataclasses.replace(load_config, load_format="auto"))

    register_model_loader("weightd_capture")(CaptureLoader)
