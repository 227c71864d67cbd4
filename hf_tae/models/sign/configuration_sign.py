"""Configuration of the decoupled SIGN multitask node classifier."""

from __future__ import annotations

from transformers import PreTrainedConfig


class SignConfig(PreTrainedConfig):
    r"""Configuration for :class:`SignForMultiTaskNodeClassification` (Grad-TAE's "SIGN_MLP").

    Args:
        in_features: width of each hop's node features.
        num_hops: number of propagated hops K; the model reads K + 1 feature blocks (hop 0 = raw).
        hidden_size: width of the per-hop MLPs and of the head's hidden layer.
        num_mlp_layers: linear layers in each per-hop MLP and in the head.
        num_tasks: one output logit per task (binary membership).
        task_names: optional names of the tasks, in logit order.
        dropout: dropout between hidden layers.
        input_dropout: dropout on the input hop features.
    """

    model_type = "tae_sign"

    def __init__(
        self,
        in_features: int = 32,
        num_hops: int = 3,
        hidden_size: int = 256,
        num_mlp_layers: int = 2,
        num_tasks: int = 1,
        task_names: list[str] | None = None,
        dropout: float = 0.5,
        input_dropout: float = 0.3,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        if task_names is not None:
            task_names = [str(name) for name in task_names]
            if num_tasks not in (1, len(task_names)):
                raise ValueError(
                    f"num_tasks={num_tasks} but {len(task_names)} task_names were given; pass one of them "
                    "or make them agree."
                )
            num_tasks = len(task_names)
        if min(in_features, num_hops + 1, hidden_size, num_mlp_layers, num_tasks) < 1:
            raise ValueError(
                "in_features, hidden_size, num_mlp_layers and num_tasks must be >= 1 and num_hops >= 0, got "
                f"{in_features=}, {hidden_size=}, {num_mlp_layers=}, {num_tasks=}, {num_hops=}."
            )
        self.in_features = in_features
        self.num_hops = num_hops
        self.hidden_size = hidden_size
        self.num_mlp_layers = num_mlp_layers
        self.num_tasks = num_tasks
        self.task_names = task_names
        self.dropout = dropout
        self.input_dropout = input_dropout
        self.initializer_range = initializer_range
        super().__init__(**kwargs)


# save_pretrained / push_to_hub write ``auto_map`` and copy this module next to the weights, so
# users without hf_tae load the model with ``AutoConfig/AutoModel...(trust_remote_code=True)``.
SignConfig.register_for_auto_class()
