"""qbudget: spend a fixed teacher-query budget on the right prompts and measure how
behaviourally indistinguishable the distilled student becomes.

See docs/design.md (vocabulary, data flow, contracts) and README.md (quick start).
"""

__version__ = "0.1.0"

from qbudget.runtime import configure_allocator as _configure_allocator

_configure_allocator()   # before XLA's threads exist; see qbudget.runtime
