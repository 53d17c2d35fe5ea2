"""`run_persona.py` with probes for tests/test_distributed.py (run under torchrun or python).

Saves each rank's weights before and after training (`weights_init_rank{r}.pt`, `weights_final_rank{r}.pt`) and,
with `PROBE_KILL_AT_STEP=N`, SIGKILLs its own process right after the checkpoint of step N is written; with
`PROBE_KILL_DURING_SAVE=N`, while that checkpoint is being written (weights and optimizer saved, trainer state not).
"""

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def install_probes() -> None:
    import torch

    from persona_trainer import PersonaTrainer

    def dump(trainer, tag):
        if trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3:
            return  # partitioned parameters: the test reads the consolidated saved model instead
        model = trainer.accelerator.unwrap_model(trainer.model)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        torch.save(state, os.path.join(trainer.args.output_dir, f"weights_{tag}_rank{trainer.args.process_index}.pt"))

    train, save_checkpoint = PersonaTrainer.train, PersonaTrainer._save_checkpoint

    def probed_train(self, *args, **kwargs):
        os.makedirs(self.args.output_dir, exist_ok=True)
        dump(self, "init")
        result = train(self, *args, **kwargs)
        dump(self, "final")
        return result

    def probed_save_checkpoint(self, *args, **kwargs):
        save_checkpoint(self, *args, **kwargs)
        if self.state.global_step == int(os.environ.get("PROBE_KILL_AT_STEP", -1)):
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup at all, as an OOM kill or a preempted node

    save_optimizer = PersonaTrainer._save_optimizer_and_scheduler

    def probed_save_optimizer(self, output_dir):
        save_optimizer(self, output_dir)
        if self.state.global_step == int(os.environ.get("PROBE_KILL_DURING_SAVE", -1)):
            os.kill(os.getpid(), signal.SIGKILL)

    PersonaTrainer.train, PersonaTrainer._save_checkpoint = probed_train, probed_save_checkpoint
    PersonaTrainer._save_optimizer_and_scheduler = probed_save_optimizer


if __name__ == "__main__":
    install_probes()
    from run_persona import cli

    cli(sys.argv[1:])
