"""Hugging Face Trainer: GradProbeCallback traces the run of a tiny, locally built BERT under one trace.

    pip install 'gradprobe[transformers]'
    python examples/hf_trainer_callback.py

Two gradient-accumulation micro-batches per step show up as two backward calls, each with its exact
part. Without transformers installed it says so and traces one plain PyTorch step instead.
"""

import tempfile

import torch
from torch import nn

import gradprobe

try:
    import transformers
    import accelerate  # noqa: F401  (Trainer needs it)
except ImportError:
    transformers = None


class Tokens(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 50, (8, 6), generator=g)
        self.labels = torch.randint(0, 2, (8,), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(6, dtype=torch.long), "labels": self.labels[i]}


def main():
    torch.manual_seed(0)
    if transformers is None:
        print("transformers is not installed (pip install 'gradprobe[transformers]'); one plain traced step:")
        net = nn.Linear(6, 2)
        with gradprobe.trace(net) as t:
            net(torch.randn(4, 6)).logsumexp(1).mean().backward()
        t.report()
        return

    from gradprobe.integrations.transformers import GradProbeCallback

    config = transformers.BertConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=50,
        max_position_embeddings=16,
    )
    model = transformers.BertForSequenceClassification(config)
    with tempfile.TemporaryDirectory() as out:
        args = transformers.TrainingArguments(
            output_dir=out, max_steps=4, per_device_train_batch_size=4, gradient_accumulation_steps=2,
            report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True,
        )
        trainer = transformers.Trainer(
            model=model, args=args, train_dataset=Tokens(), callbacks=[GradProbeCallback(every_n_steps=2)]
        )
        trainer.train()


if __name__ == "__main__":
    main()
