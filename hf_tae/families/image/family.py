"""The image family: image domains as tasks, a transformers vision backbone, the gold-class
log-odds as the score (the Grad-TAE DomainNet setting: ResNet-18, domains as tasks).

Data come from the embedded digits domains (default: scikit-learn's real 8×8 digits under
transforms, with planted groups), a DomainNet-layout folder (``--domainnet_root``) or a saved
:class:`~hf_tae.ImageDomains` (``--dataset``); every image is one row of one domain (single-label
layout). The model is :class:`~hf_tae.VisionForMultiTaskImageClassification` over a ResNet,
ConvNeXt or ViT backbone built from config (or pretrained with ``--model_name_or_path``), with
one head per domain (task-private, left out of the gradients) or a shared head.
Metrics: accuracy (selection), macro-F1 and cross-entropy (the affinity's default) per domain.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from hf_tae.errors import TaeError
from hf_tae.families import register_family
from hf_tae.families.base import TaskFamily, TaskMetrics

if TYPE_CHECKING:
    from hf_tae.tasks.taskset import TaskSet

BACKBONES = ("resnet", "convnext", "vit")


@dataclass
class ImageArguments:
    """Where the image domains come from (first match wins: dataset, domainnet_root, digits)
    and the vision model."""

    dataset: str | None = field(
        default=None, metadata={"help": "Path of a saved ImageDomains folder."}
    )
    domainnet_root: str | None = field(
        default=None,
        metadata={
            "help": "DomainNet-layout folder: <root>/<domain>/<class>/<image> and the lists "
            "<root>/<domain>_train.txt, <root>/<domain>_test.txt."
        },
    )
    domains: list[str] | None = field(
        default=None, metadata={"help": "DomainNet: the domains to use as tasks (default: all)."}
    )
    classes: list[str] | None = field(
        default=None,
        metadata={"help": "DomainNet: the classes to use (default: those shared by every domain)."},
    )
    max_per_class: int | None = field(
        default=None, metadata={"help": "DomainNet: at most this many images per domain and class."}
    )
    skip_bad_images: bool = field(
        default=False,
        metadata={
            "help": "DomainNet: leave out images that do not decode (recorded) instead of failing."
        },
    )
    views: list[str] | None = field(
        default=None,
        metadata={"help": "Digits default: the geometric views (the planted groups); default: the generator's."},
    )
    styles: list[str] | None = field(
        default=None,
        metadata={"help": "Digits default: the photometric styles within each view; default: the generator's."},
    )
    train_per_domain: int | None = field(
        default=None,
        metadata={"help": "Digits default: training images per domain (default: all of its share)."},
    )
    conflict: float = field(
        default=1.0,
        metadata={
            "help": "Digits default: share of the 16 tiles a tiles-* view moves (lower: views "
            "overlap and the planted groups weaken; 0: every view is upright)."
        },
    )
    noise_std: float = field(
        default=0.15, metadata={"help": "Digits default: Gaussian noise of the noisy style."}
    )
    data_seed_images: int = field(
        default=0, metadata={"help": "Seed of the data splits and transforms."}
    )
    image_size: int = field(
        default=0,
        metadata={"help": "Side of the model's input images (0: 8 for digits, 64 otherwise)."},
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Hub repo id or folder of a pretrained vision backbone (else built from config)."
        },
    )
    backbone: str = field(
        default="resnet",
        metadata={"help": f"Backbone built from config: one of {list(BACKBONES)}."},
    )
    hidden_sizes: list[int] = field(
        default_factory=lambda: [16, 32], metadata={"help": "Channels of each backbone stage."}
    )
    depths: list[int] = field(
        default_factory=lambda: [1, 1], metadata={"help": "Blocks in each backbone stage."}
    )
    embedding_size: int = field(default=16, metadata={"help": "Channels of the ResNet stem."})
    head: str = field(
        default="per_task",
        metadata={"help": "'per_task' (one classification head per domain) or 'shared'."},
    )


@register_family
class ImageFamily(TaskFamily):
    """Image domains as tasks with a vision backbone (the Grad-TAE DomainNet setting)."""

    name = "images"
    description = "image domains as tasks, vision backbone (default: planted digits domains)"
    arguments_class = ImageArguments
    capacity_options = ("--hidden_sizes", "--embedding_size")
    # every run takes the same number of optimizer steps: with a fixed number of epochs a domain
    # trained alone gets a fraction of the steps of a group, and "more steps" would pose as
    # transfer (with 15 epochs at 3e-3 one model on all domains then beats the planted groups)
    training_defaults = {
        "learning_rate": 1e-2,
        "max_steps": 600,
        "per_device_train_batch_size": 64,
        "per_device_eval_batch_size": 1024,
        "weight_decay": 0.0,
        "metric_for_best_model": "avg_accuracy",
    }
    # subsets estimated at a θ0 stopped at 3/4 of its steps (README: Scenarios, "An early θ0")
    pipeline_defaults = {"subset_size": 3, "num_meta_inits": 4, "early_meta_init_fraction": 0.75}
    metrics = TaskMetrics(
        selection="accuracy",
        affinity="log_loss",
        estimated=("accuracy", "log_loss"),
        labels={"f1": "macro-F1", "accuracy": "accuracy", "log_loss": "cross-entropy"},
    )
    pipeline_tag = "image-classification"

    def load_domains(self, args: ImageArguments):
        """The :class:`~hf_tae.ImageDomains` the arguments name."""
        from hf_tae.families.image.digits import make_digit_domains
        from hf_tae.families.image.domainnet import load_domainnet
        from hf_tae.families.image.domains import ImageDomains

        if args.dataset:
            return ImageDomains.load(args.dataset)
        if args.domainnet_root:
            return load_domainnet(
                args.domainnet_root,
                domains=args.domains,
                classes=args.classes,
                max_per_class=args.max_per_class,
                seed=args.data_seed_images,
                on_bad_image="skip" if args.skip_bad_images else "raise",
            )
        digits = {"views": args.views, "styles": args.styles}
        return make_digit_domains(
            **{k: v for k, v in digits.items() if v},
            train_per_domain=args.train_per_domain,
            conflict=args.conflict,
            noise_std=args.noise_std,
            seed=args.data_seed_images,
        )

    def _geometry(self, args: ImageArguments, domains) -> tuple[int, int]:
        digits = not (args.dataset or args.domainnet_root)
        size = args.image_size or (8 if digits else 64)
        channels = getattr(domains, "num_channels", None) or (1 if digits else 3)
        return size, channels

    def load_tasks(self, args: ImageArguments) -> TaskSet:
        from hf_tae.families.image.preprocessing import add_pixel_values
        from hf_tae.tasks.taskset import TaskSet

        domains = self.load_domains(args)
        size, channels = self._geometry(args, domains)
        dataset = add_pixel_values(
            domains.dataset, image_size=size, num_channels=channels, mean=0.5, std=0.5
        )
        return TaskSet(dataset, task_names=domains.task_names, input_columns=["pixel_values"],
                       source=domains)  # fmt: skip

    def model_init(self, args: ImageArguments, tasks: TaskSet):
        from hf_tae.models.vision import (
            VisionForMultiTaskImageClassification,
            VisionMultiTaskConfig,
        )

        domains = tasks.source
        class_names = list(domains.class_names)
        labels = {"id2label": dict(enumerate(class_names))}
        if args.model_name_or_path:
            return VisionForMultiTaskImageClassification.from_backbone(
                args.model_name_or_path, tasks.all_task_names, head=args.head, **labels
            )
        size, channels = self._geometry(args, domains)
        config = VisionMultiTaskConfig(
            backbone_config=self.backbone_config(args, size, channels),
            task_names=tasks.all_task_names,
            head=args.head,
            **labels,
        )
        return VisionForMultiTaskImageClassification(config)

    def widen(self, args: ImageArguments) -> ImageArguments | None:
        """Twice the channels of every stage and of the stem (``--hidden_sizes``,
        ``--embedding_size``); None for a pretrained backbone."""
        if args.model_name_or_path:
            return None
        return replace(args, hidden_sizes=[2 * h for h in args.hidden_sizes],
                       embedding_size=2 * args.embedding_size)  # fmt: skip

    @staticmethod
    def backbone_config(args: ImageArguments, image_size: int, num_channels: int):
        """The transformers config of ``--backbone`` at the requested sizes."""
        from transformers import ConvNextConfig, ResNetConfig, ViTConfig

        if args.backbone == "resnet":
            return ResNetConfig(num_channels=num_channels, embedding_size=args.embedding_size,
                                hidden_sizes=list(args.hidden_sizes), depths=list(args.depths),
                                downsample_in_first_stage=False)  # fmt: skip
        if args.backbone == "convnext":
            return ConvNextConfig(num_channels=num_channels, hidden_sizes=list(args.hidden_sizes),
                                  depths=list(args.depths), patch_size=2 if image_size <= 16 else 4)  # fmt: skip
        if args.backbone == "vit":
            width = args.hidden_sizes[-1]
            return ViTConfig(image_size=image_size, patch_size=2 if image_size <= 16 else 8,
                             num_channels=num_channels, hidden_size=width,
                             num_hidden_layers=sum(args.depths), num_attention_heads=2,
                             intermediate_size=2 * width)  # fmt: skip
        raise TaeError(f"--backbone {args.backbone!r} is not one of {list(BACKBONES)}.")

    def score_function(self, args: ImageArguments):
        from hf_tae.models.scores import GoldLogOddsScore

        return GoldLogOddsScore(label_key="example_label")  # the collector's label of each row

    def private_parameters(self, model) -> list[str]:
        pattern = model.task_head_parameter_pattern()
        return [] if pattern is None else [pattern]
