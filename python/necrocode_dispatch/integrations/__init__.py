"""Adapters that run other systems' components on the dispatcher core.

``necrocode``: NecroCode's registry, repo pool, launchers and event recorder
(needs ``necrocode`` importable; imported only when used)."""
