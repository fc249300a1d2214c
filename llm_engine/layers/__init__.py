"""Model building blocks (nn.Modules) that call llm_engine.ops: rotary tables, attention, MLP, RMSNorm."""
