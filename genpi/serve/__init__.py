"""Serving published adapters behind one OpenAI-compatible Ray Serve app.

Modules (only `app` and `llm`'s builder import Ray; `openai`, `adapters`, `deploy` stay light):
  openai.py    request/response schemas, OpenAI-shaped errors, model-id validation
  adapters.py  registry lookups (id -> fingerprint -> local adapter folder), tokens saved
  backend.py   one base model with several named PEFT adapters: load, evict, generate, stream
  deploy.py    the Serve config (YAML for `serve deploy` / KubeRay) built from a GenpiConfig
  llm.py       the GPU path: Ray Serve LLM (vLLM + LoRA) config built from the same GenpiConfig
  app.py       the Ray Serve deployments (FastAPI ingress -> multiplexed adapter replicas)
"""
