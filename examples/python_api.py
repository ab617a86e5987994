"""preftune from Python: SFT then DPO on records held in memory, with an in-memory model.

    python examples/python_api.py [OUT_DIR]

Runs in about a minute on a CPU with the tiny random model; set MODEL=smollm2-135m for the embedded SmolLM2.
"""

import os
import sys

import datasets

import preftune

out = sys.argv[1] if len(sys.argv) > 1 else "runs/api-example"
model = os.environ.get("MODEL", "tiny")
pairs = [{"prompt": f"Review {i}: the film was", "chosen": " moving and beautifully shot.",
          "rejected": " a waste of two hours."} for i in range(16)]

# SFT on the chosen responses (a list of dicts), then DPO from it on a datasets.Dataset
sft = preftune.sft(model=model, train_data=pairs, train={"max_steps": 4, "batch_size": 4, "lr": 1e-4},
                   run={"dir": f"{out}/sft", "plot": False, "overwrite": True})
policy, tokenizer = sft.model, sft.tokenizer  # the SFT policy, in memory
result = preftune.dpo(model=policy, tokenizer=tokenizer, train_data=datasets.Dataset.from_list(pairs),
                      dpo={"beta": 0.1}, train={"max_steps": 4, "batch_size": 4, "lr": 1e-4},
                      run={"dir": f"{out}/dpo", "plot": False, "overwrite": True})
print(f"SFT loss {sft.train['loss']:.4f}; DPO loss {result.train['loss']:.4f} after {result.step} steps, "
      f"reward accuracy {result.train['rewards/accuracies']:.2f}; policy in {result.run_dir / 'policy'}")
