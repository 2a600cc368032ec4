"""Pruned students (CAP, cap-pruning spec): plain PyTorch, no Ray, beside losses and models.

schedule.py    the cubic kept-fraction schedule of unstructured pruning, the steps of structured pruning
masks.py       masks in the forward of HF BERT layers: per-weight masks on the six matrices of a layer
               (movement, soft movement, magnitude), gates on attention heads and FFN neurons
importance.py  first-order importance of heads and neurons, and which ones the next step prunes
physical.py    the physically smaller copy of a head/neuron-pruned model (for latency)
accounting.py  sparsity as the paper counts it (encoder_remaining) and nonzero inference parameters
banks.py       the memory banks of the contrastive modules (PrC, SnC, FiC)

The contrastive loss itself is ``metakd.losses.cap_contrastive_loss``; the training path that
puts these together is ``metakd.train.pruned``.
"""
