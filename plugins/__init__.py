"""lorazoo's built-in variants. Each module is a plugin registered through the ``lorazoo``
entry-point group, exactly as a third-party package registers its own."""
