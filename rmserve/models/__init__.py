"""Model backends (one module per kind): know torch, know nothing of asyncio or HTTP."""
