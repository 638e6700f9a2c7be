"""Integrations of xentlib with other libraries.

Each submodule imports its library only when it is used: `import xentlib` and
`import xentlib.integrations.transformers` import no transformers.
"""
