"""The stores' one exception: what a store could not do, said so a user can act on it. The CLI prints
it as one line (runner translates it; stores know nothing of runner)."""


class StoreError(Exception):
    pass
