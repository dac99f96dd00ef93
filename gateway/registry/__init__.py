"""`models.yaml` into typed settings: the registry every other package reads.

`config` is the schema with every default; `yaml_reader` reads the file with bounded cost;
`load` validates it and words each mistake (hints in `config_hints`); `chat_templates` and
`hub` resolve what an entry points at; `schema` exports it. Applying an edited file is
`gateway/reloader.py`, beside the app it changes.
"""
