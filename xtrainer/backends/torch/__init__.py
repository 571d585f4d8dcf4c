"""The native PyTorch backend (eager / torch.compile, amp, DDP, FSDP2)."""
