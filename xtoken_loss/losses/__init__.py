"""The loss kinds, one module each (the registry, `xtoken_loss.registry`, lists them): P-KL (`pkl`),
same-vocab KL (`kl`), CE (`ce`), the H-KL / GOLD hybrids (`hybrid`), ULD (`uld`), ALM (`alm`),
P-KL through a learned W (`learned_pkl`), and KD + CE (`combine`)."""
