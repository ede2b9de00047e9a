"""`python -m flexpredict_zoo.train ...` (and `torchrun -m flexpredict_zoo.train ...`) = `flexpredict-train ...`."""
from .cli import main

raise SystemExit(main())
