"""What a model is: preprocessing spec and transform, tokenizer, prompt templates, model zoo loading
(open_clip, Hugging Face, local checkpoints) and the built-in demo model with its trainer.

Imports nothing of ours. torch is imported only by the zoo and the demo trainer; the tokenizer,
preprocessing and templates modules are torch-free because the service uses them.
"""
