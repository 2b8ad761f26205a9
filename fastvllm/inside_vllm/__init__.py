"""Code that runs inside vLLM's processes, kept apart from the code that manages them from
outside: the API-server entry (:mod:`.api_entry`), its control channel (:mod:`.control`,
whose client half the CLI uses), and the worker extension (:mod:`.worker_extension`)."""
