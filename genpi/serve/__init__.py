"""Serving published adapters behind one OpenAI-compatible Ray Serve app.

Modules (only `app`, `replica` and `lifecycle` import Ray; `openai`, `adapters`, `config` stay light):
  openai.py    request/response schemas, OpenAI-shaped errors, model-id validation
  adapters.py  registry lookups (id -> fingerprint -> local adapter folder), export for Ray Serve LLM
  backend.py   one base model with several named PEFT adapters: load, evict, generate, stream
  config.py    the Serve config (YAML for `serve deploy` / KubeRay) and the GPU path's Ray Serve
               LLM (vLLM + LoRA) config, both built from a GenpiConfig as plain data
  app.py       the Ray Serve app: FastAPI ingress -> multiplexed adapter replicas (build_app)
  replica.py   the model replica deployment (GenpiAdapters)
  lifecycle.py start / stop the app; SIGTERM (`ray job stop`) deletes it
The tokens a request saves come from genpi.chat, the rule every stage uses.
"""
