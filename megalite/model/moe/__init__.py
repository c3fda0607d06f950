"""Mixture of experts: the router (router.py), the auxiliary losses' path into the training loss
(aux_loss.py), the experts and the token permutation (experts.py), and the layer that replaces an MLP
(layer.py).  Settings: megalite/config/moe_settings.py."""
