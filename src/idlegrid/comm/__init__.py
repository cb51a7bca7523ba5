"""Communication for training over slow links: activation and gradient compression.

Modules here import torch at their top; `idlegrid.core` never imports them, and this
package's __init__ imports none of them, so `import idlegrid.comm` stays light.
"""
