"""The finetune stage: its strategies (strategies/), the shared epoch loop, cached activations, the
negative-transfer guard, distillation and `tlops tune`'s study."""
