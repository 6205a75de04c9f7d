"""The QLoRA example as a LightningCLI: everything, the callback included, comes from a YAML file.

    python examples/cli.py fit --config examples/cli_config.yaml
    python examples/cli.py fit --config examples/cli_config.yaml --trainer.max_steps=200 --model.lr=1e-3
    python examples/cli.py fit --print_config   # every option, with its default

The model and data module are the ones of ``qlora_finetune.py``; ``BnbQuantization`` is configured
under ``trainer.callbacks`` with a ``class_path`` like any other callback.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI
from qlora_finetune import CausalLM, TextDataModule


class QLoRACLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The tokenizer must be the model's own: one directory for both, set once as model.model_path.
        parser.link_arguments("model.model_path", "data.tokenizer_path")


def main(args=None) -> QLoRACLI:
    return QLoRACLI(CausalLM, TextDataModule, args=args)


if __name__ == "__main__":
    main()
