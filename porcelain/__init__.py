"""porcelain: synthetic training images for scarce, long-tailed image classification.

The library is pure: no Prefect imports below this package. Flows (``flows/``) and tasks
(``tasks/``) wire these functions together.
"""

__version__ = "0.1.0"
