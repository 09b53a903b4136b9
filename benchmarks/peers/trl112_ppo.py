"""Peer baseline: TRL 1.12's experimental PPOTrainer (the last TRL release that shipped PPO)
on a from-scratch Llama, CPU. Prints episodes/s and peak RSS, so the project's PPO can be
timed on the same settings in the same run (benchmarks/ppo_memory.py).
The shared peer script (../shared/peers/trl112_ppo.py) with two more settings, kv_heads (grouped
query attention) and tied (tied input and output embeddings), as 135M-class models have them; random
prompt ids of exactly prompt_len tokens, and a model vocabulary of `vocab` even where
the small corpus gives the tokenizer fewer tokens (ids it lacks decode to nothing).
Run with a venv holding torch==2.13.0 trl==1.12.0 (../shared/peers/setup.sh)."""
import json, os, resource, sys, tempfile, time
import torch
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast

PPO_BENCH = dict(hidden=256, layers=4, heads=4, inter=512, vocab=1024, prompt_len=16,
                 response_length=32, batch=16, mini_batches=2, ppo_epochs=2, episodes=128, seed=0,
                 kv_heads=4, tied=False)
b = {**PPO_BENCH, **json.loads(sys.argv[1] if len(sys.argv) > 1 else "{}")}
torch.manual_seed(b["seed"]); torch.set_num_threads(int(os.environ.get("THREADS", "2")))

animals = ["chicken", "duck", "cow", "dog", "cat", "horse", "spider", "ant", "bee"]
texts = [f"How many legs do {n} {a}s have? {n} {a}s have {n*2} legs." for n in range(1, 60) for a in animals]
tk = Tokenizer(models.BPE()); tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False); tk.decoder = decoders.ByteLevel()
tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=b["vocab"], special_tokens=["<pad>", "<eos>"],
                                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>")
tok.padding_side = "left"
cfg = dict(vocab_size=max(len(tok), b["vocab"]),  # the model's vocabulary, whatever the corpus gave the tokenizer
           hidden_size=b["hidden"], intermediate_size=b["inter"], num_hidden_layers=b["layers"],
           num_attention_heads=b["heads"], num_key_value_heads=b["kv_heads"], max_position_embeddings=256,
           pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id,
           tie_word_embeddings=b["tied"])
policy = LlamaForCausalLM(LlamaConfig(**cfg)); ref = LlamaForCausalLM(LlamaConfig(**cfg)); ref.load_state_dict(policy.state_dict())
rm = LlamaForSequenceClassification(LlamaConfig(**cfg, num_labels=1)); vm = LlamaForSequenceClassification(LlamaConfig(**cfg, num_labels=1))
ids = torch.randint(2, len(tok), (b["episodes"] * 2, b["prompt_len"]), generator=torch.Generator().manual_seed(b["seed"]))
ds = Dataset.from_dict({"input_ids": ids.tolist()})

from trl.experimental.ppo import PPOConfig, PPOTrainer
args = PPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=b["batch"] // b["mini_batches"],
                 gradient_accumulation_steps=1, num_mini_batches=b["mini_batches"], num_ppo_epochs=b["ppo_epochs"],
                 total_episodes=b["episodes"], response_length=b["response_length"], local_rollout_forward_batch_size=b["batch"],
                 stop_token="eos", missing_eos_penalty=1.0, report_to=[], save_strategy="no", use_cpu=True,
                 num_sample_generations=0, logging_steps=1000, seed=b["seed"])
trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=rm, value_model=vm, train_dataset=ds)
t = time.perf_counter(); trainer.train(); dt = time.perf_counter() - t
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"peer": "trl-1.12.0 experimental PPOTrainer", **b, "seconds": round(dt, 2),
                  "episodes_per_s": round(b["episodes"] / dt, 2), "peak_rss_mb": round(rss)}))
