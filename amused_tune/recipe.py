"""The recipe schema: one YAML file describes one run.

Every field's docstring is its help text (`amused-tune RECIPE.yaml --help`) and its documentation. The sections
are typed dataclasses parsed by jsonargparse, so `--train.max_steps=10` overrides a value, an unknown key or a
wrong type fails before any model is loaded, and `--print_config` prints the resolved recipe.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

from amused_tune import optimizers
from amused_tune.common import DTYPE_NAMES, GUIDANCE_SCHEDULES

Precision = Literal[DTYPE_NAMES]
GuidanceSchedule = Literal[GUIDANCE_SCHEDULES]
OptimizerName = Literal[optimizers.NAMES]


class RecipeError(ValueError):
    """A recipe value that cannot work; the message names the key and what to pass instead."""


def _positive(section: str, **values: float) -> None:
    for key, value in values.items():
        if value is None or value <= 0:
            raise RecipeError(f"{section}.{key} must be > 0, got {value}")


@dataclass
class ModelConfig:
    base: str = "tiny"
    """Base model: a Hub id (amused/amused-256, amused/amused-512), a local pipeline folder, `tiny` (random,
    built in code, CPU-sized) or `toy` (the small pretrained model shipped with the kit)."""
    resolution: Optional[int] = None
    """Training image size in pixels; must equal the base model's (256 or 512 for aMUSEd). None: the model's."""
    dtype: Precision = "fp32"
    """Precision the frozen weights are held in (bf16/fp16 halve their memory). Trainable weights stay fp32."""
    quantize: Optional[Literal["8bit", "4bit"]] = None
    """LoRA only, CUDA only: hold the frozen U-ViT's linear layers in bitsandbytes 8-bit or 4-bit (QLoRA-style)."""


SourceKind = Literal["folder", "imagefolder", "captionfolder", "hub", "single_image"]


@dataclass
class SourceConfig:
    """One entry of `data.sources`: a dataset card or a source, its own prompt rules, and how often it is drawn."""

    card: Optional[str] = None
    """A dataset card (a name from datasets_cards/ or a path), as data.card."""
    source: Optional[SourceKind] = None
    """As data.source."""
    path: Optional[str] = None
    """As data.path."""
    split: Optional[str] = None
    """hub: as data.split."""
    image_column: Optional[str] = None
    """hub: as data.image_column."""
    caption_column: Optional[str] = None
    """hub and imagefolder: as data.caption_column."""
    prompt: Optional[str] = None
    """As data.prompt: one caption for every image of this source."""
    prompt_prefix: Optional[str] = None
    """As data.prompt_prefix, for this source's prompts."""
    prompt_template: Optional[str] = None
    """As data.prompt_template, for this source's prompts."""
    trigger_word: Optional[str] = None
    """As data.trigger_word, for this source's prompts (e.g. on the subject's images, not the regularization set)."""
    repeats: int = 1
    """How many times each of this source's images is in one epoch (20 images x 10 repeats + 200 others: half the
    draws are the 20)."""


@dataclass
class DataConfig:
    """The training data. Keys left unset (null) come from the dataset card, then from the defaults named below."""

    card: Optional[str] = None
    """A dataset card: a name from datasets_cards/ (nouns, minecraft, styledrop, local_imagefolder,
    local_captionfolder) or a path to a card YAML. Every key below that the recipe sets overrides the card's."""
    source: Optional[Literal["folder", "imagefolder", "captionfolder", "hub", "single_image"]] = None
    """folder: your folder of images, captioned by its metadata.jsonl when it has one, else by a same-named .txt per
    image; imagefolder: a folder with metadata.jsonl ({"file_name", caption column} per line); captionfolder: image
    files each with a same-named .txt caption; hub: a Hub dataset id or a local save_to_disk folder; single_image:
    one image file with `prompt`. Given on the command line (or data.card is), it replaces the recipe's source:
    the recipe's path, prompt, columns and prompt prefix/template are dropped unless given there too."""
    path: Optional[str] = None
    """Folder (imagefolder, captionfolder), image file (single_image), or Hub dataset id / save_to_disk folder
    (hub). Relative paths are tried from the working directory, then from the kit's folder."""
    split: Optional[str] = None
    """hub: the dataset split (default train)."""
    image_column: Optional[str] = None
    """hub: the column holding the image (default image)."""
    caption_column: Optional[str] = None
    """hub and imagefolder: the column / metadata key holding the caption (default text)."""
    prompt: Optional[str] = None
    """single_image: the image's caption, e.g. 'A mushroom in [V] style'. Other sources: when set, the caption
    of every image (their own captions are ignored)."""
    prompt_prefix: Optional[str] = None
    """Prepended to every prompt, e.g. 'minecraft ' (default empty)."""
    prompt_template: Optional[str] = None
    """The prompt made from a caption; `{caption}` is replaced by it (default '{caption}')."""
    center_crop: Optional[bool] = None
    """After resizing the short side to the resolution: true (default) crops the centre, false a random square."""
    random_flip: Optional[bool] = None
    """Flip images horizontally with probability 0.5 (default false)."""
    min_image_size: Optional[int] = None
    """Images whose short side is below this many pixels are bad samples (default: the model's resolution;
    0 upscales everything)."""
    pixel_art: Optional[Union[bool, Literal["auto"]]] = None
    """auto (default): find pixel art (images of flat k x k blocks, or small images of few colours), reduce it to
    its native grid and enlarge it by a whole factor with nearest-neighbour (cropped or padded with
    data.background, never resampled); photos are resized as before. true: every image is pixel art; false: none.
    What was found is in OUTPUT_DIR/data_report.json (docs/pixel_art.md)."""
    background: str = "#ffffff"
    """The colour transparent pixels are laid over, and pixel art is padded with: "#RRGGBB" (quoted in YAML, where
    # starts a comment), RRGGBB or a colour name. Default "#ffffff", white."""
    cache: bool = True
    """Encode every image to VQ tokens and every caption to text embeddings once, before training, and train from
    that cache with the VQ model and text encoder moved to the CPU. See docs/data.md."""
    cache_dir: Optional[str] = None
    """Where the cache lives (default $AMUSED_TUNE_CACHE, else ~/.cache/amused-tune); entries are keyed by a
    fingerprint of the data, the preprocessing and the model, so runs over the same data share them."""
    random_crops: int = 4
    """With center_crop=false and the cache on: crops cached per image (and per flip); training picks one."""
    on_bad_sample: Literal["skip", "error"] = "skip"
    """A bad sample (unreadable, not an image, too small, no caption): skip it (counted in the log and in
    OUTPUT_DIR/data_report.json) or stop before training, naming the file."""
    num_workers: int = 0
    """DataLoader worker processes (0 = load in the training process)."""
    trigger_word: Optional[str] = None
    """Written in front of every training prompt as its first tag ("sks, a photo of a dog"); never shuffled."""
    shuffle_tags: bool = False
    """Shuffle the comma-separated tags of each prompt every time it is drawn (after the trigger word and the first
    keep_tags). The text encoder then encodes each batch (the text-embedding cache is not used; tokens still are)."""
    keep_tags: int = 0
    """With shuffle_tags: how many leading tags stay in place (after the trigger word)."""
    caption_dropout: Optional[float] = None
    """Probability that a sample is trained with the empty prompt instead of its caption. The same mechanism as
    train.cond_dropout (which this value replaces when set): the sample's text conditioning becomes the empty
    prompt's, for that sample and draw only."""
    colour_variants: int = 0
    """Recoloured copies of each image, trained on beside it (0: none). Each moves every colour its caption names
    (and the image shows) to another colour of `colours` and rewrites those words of the caption ("a red triangle
    on a white background in [V] style" -> "a green triangle on a yellow background in [V] style"); colours the
    caption does not name are the style and are kept. A fixed set per image, cached like flips and crops. For
    single-image StyleDrop: the style then shows on many contents, not only the image's own (docs/styledrop.md)."""
    colours: Optional[dict[str, tuple[int, int, int]]] = None
    """The colour vocabulary of colour_variants: name -> [R, G, B]. A pixel belongs to its nearest colour here, a
    caption's colour words are the names here, and the recoloured variants use these colours. Null: basic colour
    names (red, orange, yellow, green, blue, purple, pink, brown, white, grey, black)."""
    sources: list[SourceConfig] = field(default_factory=list)
    """Several data sources in one run, instead of data.card/source/path: a list of {card or source + path,
    repeats, prompt rules}. The other data keys (crops, flips, cache...) apply to every source. Each source is
    cached once, whatever its repeats."""


@dataclass
class AdapterConfig:
    kind: Literal["lora", "dora", "lokr", "loha", "full"] = "lora"
    """lora: train low-rank adapters on `targets`; dora: weight-decomposed LoRA (peft's DoRA: a LoRA on the
    direction of each weight plus a trained magnitude per output, saved in the same two formats); lokr / loha:
    peft's LoKr (Kronecker product) / LoHa (Hadamard product) on `targets`, with r = rank and alpha = alpha,
    saved in peft's format only: the kit's sampler, merge and peft load them, diffusers does not; full: train
    every weight of the U-ViT."""
    rank: int = 16
    """LoRA rank r (LoKr / LoHa: peft's r)."""
    alpha: float = 32.0
    """LoRA alpha; the update is scaled by alpha / rank. Saved with the adapter, so it reloads at this strength."""
    targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v"])
    """Module names that get a LoRA (default: the QKV projections of every attention of the U-ViT)."""
    dropout: float = 0.0
    """Dropout on the LoRA input."""
    text_encoder: bool = False
    """Also train a LoRA on the CLIP text encoder's q_proj/k_proj/v_proj (disables the text-embedding cache)."""
    text_encoder_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj"])
    """Modules of the text encoder that get a LoRA."""


@dataclass
class OptimConfig:
    name: OptimizerName = "adamw"
    """The optimizer (`--help` lists each with its usual lr, from amused_tune/optimizers.py; docs/options.md
    compares them)."""
    lr: Optional[float] = None
    """Peak learning rate. Null: the optimizer's usual value (listed under optim.name; prodigy's multiplies the step
    size it estimates)."""
    adam_8bit: bool = False
    """Shorthand for optim.name=adamw8bit (bitsandbytes' 8-bit AdamW)."""
    weight_decay: float = 0.01
    """Decoupled weight decay (of matrices only: biases and norm scales get none)."""
    betas: Optional[tuple[float, float]] = None
    """Moment decay rates (beta1, beta2). Null: the optimizer's usual ones ((0.9, 0.99) for lion8bit, else
    (0.9, 0.999)). Adafactor: unused."""
    eps: float = 1.0e-8
    """AdamW / Prodigy epsilon."""
    d_coef: float = 1.0
    """prodigy: multiplies its estimated step size d (above 1 learns faster, below 1 slower)."""
    use_bias_correction: bool = True
    """prodigy: Adam-style bias correction of the step (recommended by Prodigy's authors for diffusion models)."""
    safeguard_warmup: Optional[bool] = None
    """prodigy: keep lr warmup out of the step-size estimate, so warmup does not inflate it. Null: true when
    optim.warmup_steps > 0. (Prodigy's own estimate grows from d0=1e-6 over the first steps: a warmup of its own.)"""
    scheduler: Literal["constant", "cosine", "linear"] = "constant"
    """Learning-rate schedule after warmup."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup from 0 to lr."""
    max_grad_norm: float = 1.0
    """Clip the gradient norm to this value (0 disables clipping)."""

    @property
    def resolved_name(self) -> str:
        """optim.name, with optim.adam_8bit turning adamw into adamw8bit."""
        return "adamw8bit" if self.adam_8bit and self.name == "adamw" else self.name

    @property
    def resolved_safeguard_warmup(self) -> bool:
        return self.warmup_steps > 0 if self.safeguard_warmup is None else self.safeguard_warmup


@dataclass
class TrainConfig:
    batch_size: int = 1
    """Images per micro-batch, per process."""
    grad_accum: int = 1
    """Micro-batches per optimizer step. Effective batch = batch_size x grad_accum x processes."""
    max_steps: int = 1000
    """Optimizer steps to train for."""
    precision: Precision = "bf16"
    """Autocast precision of the forward pass (fp16 uses loss scaling). CPU runs fall back from fp16 to bf16."""
    grad_checkpointing: bool = False
    """Recompute the transformer layers' activations in the backward pass: less memory, ~30% slower."""
    seed: int = 0
    """Seed of the weights' init, data order, masks and condition dropout."""
    checkpoint_every: int = 250
    """Write a resumable checkpoint every N optimizer steps (and at the end)."""
    keep_checkpoints: int = 2
    """Checkpoints kept; older ones are deleted once a newer one is complete."""
    resume: str = "auto"
    """auto: continue from the newest complete checkpoint in output.dir; none: start fresh; or a checkpoint path."""
    cond_dropout: float = 0.1
    """Probability of replacing a sample's text conditioning with the empty prompt's (for classifier-free guidance)."""
    label_smoothing: float = 0.0
    """Label smoothing e in [0, 1) of the masked-token cross-entropy (as torch's cross_entropy): each target is
    (1 - e) on its code plus e spread over all codes; keeps the logits of never-right codes calibrated."""
    min_masking_rate: float = 0.0
    """Lowest share of an image's tokens masked per training example: the cosine-schedule rate is raised to at
    least this value (as diffusers' aMUSEd trainer does); 0 keeps the plain schedule."""
    max_masking_rate: float = 1.0
    """Highest share of an image's tokens masked per training example (the prior images' too): the cosine-schedule
    rate is lowered to at most this value; 1 keeps the plain schedule. Single-image StyleDrop uses 0.5: with
    every token masked the only way to predict the one image is to learn it whole (its shape, its colours) as
    what `[v]` means; with half of it visible the content is given and the adapter learns what the style adds."""
    compile: Union[bool, Literal["auto"]] = "auto"
    """torch.compile the U-ViT for training: true, false, or auto: off on the CPU and with a quantized base; on a
    GPU the first 3 steps run eagerly and time a step, then the U-ViT compiles if the steps left would repay the
    compile time (~2 min) twice over. The compile time is logged and written to metrics.jsonl (compile_s)."""
    skip_nonfinite: bool = False
    """On a non-finite loss or gradient, skip the step (counted in metrics) instead of stopping the run."""
    log_every: int = 1
    """Write metrics.jsonl every N optimizer steps."""
    device: Optional[str] = None
    """Force a device (cpu, cuda); None: what accelerate picks."""
    ema_decay: float = 0.0
    """Keep an exponential moving average of the trained weights with this decay (e.g. 0.999; 0: none). The
    average is what is saved (adapter/ or transformer/; the last trained weights go to adapter-raw/), sampled in
    validation and pushed; checkpoints hold both. Warm-up: after optimizer step n the decay is
    min(ema_decay, (1 + n) / (10 + n))."""
    ema_device: Literal["same", "cpu"] = "same"
    """Where the EMA copy (fp32, one per trainable weight) lives: same (next to the weights, the GPU when training
    on one) or cpu (no GPU memory; the update copies the weights to the CPU every step)."""


@dataclass
class ValidationConfig:
    prompts: Union[list[str], str] = field(default_factory=list)
    """Prompts of the sample grid written to samples/step-N.png: a list, or one prompt (none: no validation)."""
    from_data: int = 0
    """When prompts is empty: the first N distinct captions of a local data source become the prompts (0: none)."""
    every: int = 250
    """Write a sample grid every N optimizer steps (and before step 0 and at the end)."""
    steps: Optional[int] = None
    """MaskGIT decoding steps (null: the base's sampling.json, else 12)."""
    guidance: Optional[float] = None
    """Classifier-free guidance scale (null: the base's sampling.json, else 10.0)."""
    guidance_schedule: Optional[GuidanceSchedule] = None
    """How the guidance scale g moves over the steps: constant, linear (0 -> g), cosine (follows the mask
    schedule up to g), ramp1 (1 -> g). Null: the base's sampling.json, else constant."""
    temperature: Optional[tuple[float, float]] = None
    """Gumbel temperature (START, END), linear over the steps (null: the base's sampling.json, else (2.0, 0.0))."""
    min_p: Optional[float] = None
    """Truncation: codes less likely than min_p x the most likely code are never drawn (0: off; null: the base's
    sampling.json, else 0). Keeps a model trained with label smoothing from drawing stray cells."""
    top_k: Optional[int] = None
    """Truncation: only the top_k most likely codes of each token can be drawn (0: off; null: the base's
    sampling.json, else 0)."""
    seed: int = 0
    """Seed of the first image; image i uses seed + i."""
    images_per_prompt: int = 1
    """Images per prompt in the grid."""
    pixel_grid: Optional[int] = None
    """Pixel art: each sample becomes an N x N grid of flat cells (the N x N sprite, shown enlarged with nearest in
    the grid). Recorded with the weights, so `amused-tune sample --adapter RUN` does the same (docs/pixel_art.md)."""
    palette: Optional[Union[int, str]] = None
    """Pixel art: the samples' colours: K (chosen per image), a .hex (Lospec) or GIMP .gpl file, an image whose
    colours are the palette, or data (the training set's colours, from data_report.json). Recorded with the weights."""
    transparent: bool = False
    """Pixel art: the background (the outer ring's most common colour, connected to the edge) becomes transparent;
    the sample is then RGBA. Recorded with the weights."""
    holdout: int = 0
    """Hold this many images out of training and log their masked-token loss (fixed mask rates and seeds, so
    comparable step to step) every `every` steps: metrics.jsonl `heldout_loss`, loss.png, TensorBoard, the card.
    When it rises while the training loss falls, the run overfits (docs/options.md)."""


@dataclass
class PriorConfig:
    """Prior preservation (DreamBooth's class-prior loss): at the start of a run the base itself, before any
    adapter, draws images for prompts without the new token (at its sampling defaults); they are cached in
    OUTPUT_DIR/prior/ and every micro-batch trains on them too, so the adapter changes only what the new token
    asks for. Loss = loss on the training images + weight x loss on the prior images. No prompts: off."""

    prompts: Union[list[str], str] = field(default_factory=list)
    """Prompts without the new token, e.g. ['a cat', 'a house']: a list, or the path of a text file with one
    prompt per line (relative paths are tried from the working directory, then from the kit's folder)."""
    images_per_prompt: int = 1
    """Images the base draws per prompt."""
    weight: float = 1.0
    """lambda: the weight of the prior images' loss against the training images' loss."""
    seed: int = 0
    """Seed of the first prior image; image i uses seed + i."""


@dataclass
class StyleDropConfig:
    """StyleDrop's feedback rounds in one command (docs/styledrop.md). Round 1 trains on the data; every later round
    draws candidates with the previous round's adapter, keeps the ones a picker accepts (the toy's classifier on
    model.base=toy, a CLIP model elsewhere) and trains a fresh adapter on them, the earlier rounds' kept ones and the
    data. With rounds > 1, round k's run is OUTPUT_DIR/round-k/ and its candidates OUTPUT_DIR/round-k/candidates/,
    except the last round, whose run is OUTPUT_DIR itself (so sample, merge and push use it). Rerunning the command
    resumes wherever it stopped, inside a round's training or its candidates."""

    rounds: int = 1
    """Training rounds: 1 trains on the data only; 2 adds StyleDrop's feedback round (round 1, then candidates drawn
    with its adapter and picked, then a fresh adapter trained on what was kept); 3 or more repeat the feedback."""
    prompts: Union[list[str], str] = field(default_factory=list)
    """The prompts candidates are drawn for, with the style's token (e.g. 'A house in [V] style'): a list, or the
    path of a text file with one prompt per line (relative paths are tried from the working directory, then from
    the kit's folder). Needed when rounds > 1."""
    per_prompt: int = 2
    """Candidates drawn per prompt at each of adapter_scales."""
    adapter_scales: list[float] = field(default_factory=lambda: [1.0])
    """Strengths of the previous round's adapter the candidates are drawn at (1: as trained); a style drawn too
    weakly on some content shows up at a higher one, e.g. [1, 1.5]."""
    seed: int = 0
    """Seed of round 2's first candidate (candidate i uses seed + i; round k adds 10000 x (k - 2))."""
    batch_size: int = 8
    """Candidates drawn per sampling call (the memory estimate counts this batch, with guidance's second row)."""
    pick: Literal["auto", "toy", "clip", "all"] = "auto"
    """Who keeps candidates: toy (the toy world's exact classifier: style, caption and no stray cell; model.base=toy
    only), clip (a CLIP model, styledrop.clip_model: candidates at or above the median in both content, the
    image-prompt score, and style, the image-to-style-image score), all (every candidate: no feedback), auto (toy on
    the toy base, else clip when styledrop.clip_model is set, else all, said at the start)."""
    clip_model: Optional[str] = None
    """The CLIP model of pick=clip: a Hub id (downloaded once into the Hugging Face cache) or a local folder holding
    a CLIPModel and its tokenizer, e.g. openai/clip-vit-base-patch32. It runs on the CPU."""

    def picker(self, base: str) -> str:
        """The picker `pick` resolves to on `base`: toy, clip or all."""
        if self.pick != "auto":
            return self.pick
        return "toy" if base == "toy" else "clip" if self.clip_model else "all"

@dataclass
class OutputConfig:
    dir: str = "runs/default"
    """Output folder: recipe.yaml, adapter/ or transformer/, checkpoints/, samples/, metrics.jsonl, README.md.
    `{section.key}` is replaced by that recipe value, e.g. runs/pixel-{adapter.kind}-r{adapter.rank}."""
    overwrite: bool = False
    """Start over in an output folder that already holds a run (of a different recipe, or with train.resume=none):
    its checkpoints, metrics.jsonl, samples, adapter/transformer, loss.png and logs are discarded first."""
    push_to_hub: bool = False
    """Push the adapter, card and samples to the Hub at the end of the run."""
    hub_repo_id: Optional[str] = None
    """Hub repository for push_to_hub, e.g. user/pixel-art-lora."""
    hub_private: bool = False
    """Create the Hub repository as private."""
    tensorboard: bool = False
    """Also log metrics and sample grids to TensorBoard (OUTPUT_DIR/logs); the same as log_with: [tensorboard]."""
    log_with: list[Literal["tensorboard", "wandb"]] = field(default_factory=list)
    """Experiment trackers that get the metrics and sample grids: tensorboard (OUTPUT_DIR/logs), wandb (each an
    optional extra: pip install "amused-tune[tensorboard]" or "amused-tune[wandb]")."""
    loss_plot: bool = True
    """Write loss.png (the loss curve) at the end of the run."""


@dataclass
class Recipe:
    """One fine-tuning run of aMUSEd."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    styledrop: StyleDropConfig = field(default_factory=StyleDropConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def resolve(self) -> "Recipe":
        """Fill what the recipe leaves to the kit (idempotent): `{section.key}` in output.dir, one validation prompt
        as a list, the optimizer's usual lr and betas (the registry's), train.cond_dropout from
        data.caption_dropout. Raises RecipeError when output.dir names no recipe key."""
        self.output.dir = self._expand(self.output.dir)
        if isinstance(self.validation.prompts, str):  # one prompt
            self.validation.prompts = [self.validation.prompts]
        o = self.optim
        usual = optimizers.REGISTRY[o.resolved_name]
        o.lr = usual.lr if o.lr is None else o.lr
        o.betas = tuple(usual.betas if o.betas is None else o.betas)
        if self.data.caption_dropout is not None:
            self.train.cond_dropout = self.data.caption_dropout  # one mechanism: the empty prompt's conditioning
        return self

    def validate(self) -> "Recipe":
        """Refuse values that types alone cannot, in a resolved recipe (`resolve`); raises RecipeError naming the
        key. Changes nothing."""
        self._check_optimizer()
        _positive("optim", lr=self.optim.lr, d_coef=self.optim.d_coef)
        _positive("train", batch_size=self.train.batch_size, grad_accum=self.train.grad_accum,
                  max_steps=self.train.max_steps, checkpoint_every=self.train.checkpoint_every,
                  log_every=self.train.log_every)
        _positive("validation", every=self.validation.every)
        if self.validation.holdout < 0:
            raise RecipeError(f"validation.holdout must be >= 0 (images held out of training), got {self.validation.holdout}")
        if self.validation.steps is not None:
            _positive("validation", steps=self.validation.steps)
        if self.validation.min_p is not None and not 0 <= self.validation.min_p < 1:
            raise RecipeError(f"validation.min_p must be in [0, 1) (0: off), got {self.validation.min_p}")
        self._check_pixel_art()
        if self.validation.top_k is not None and self.validation.top_k < 0:
            raise RecipeError(f"validation.top_k must be >= 0 (0: off), got {self.validation.top_k}")
        if self.adapter.kind != "full":
            _positive("adapter", rank=self.adapter.rank, alpha=self.adapter.alpha)
        self._check_lycoris()
        if self.prior.images_per_prompt < 1 or self.prior.weight < 0:
            raise RecipeError(f"prior.images_per_prompt must be >= 1 and prior.weight >= 0, got "
                              f"{self.prior.images_per_prompt} and {self.prior.weight}")
        self._check_captions()
        self._check_sources()
        self._check_styledrop()
        if not 0 <= self.train.cond_dropout <= 1:
            raise RecipeError(f"train.cond_dropout must be in [0, 1], got {self.train.cond_dropout}")
        if not 0 <= self.train.label_smoothing < 1:
            raise RecipeError(f"train.label_smoothing must be in [0, 1), got {self.train.label_smoothing}")
        if not 0 <= self.train.ema_decay < 1:
            raise RecipeError(f"train.ema_decay must be in [0, 1) (0: no EMA; usual 0.99-0.9999), got {self.train.ema_decay}")
        if not 0 <= self.train.min_masking_rate <= 1:
            raise RecipeError(f"train.min_masking_rate must be in [0, 1], got {self.train.min_masking_rate}")
        if not 0 < self.train.max_masking_rate <= 1 or self.train.max_masking_rate < self.train.min_masking_rate:
            raise RecipeError(f"train.max_masking_rate must be in (0, 1] and >= train.min_masking_rate "
                              f"({self.train.min_masking_rate}), got {self.train.max_masking_rate}")
        if self.train.keep_checkpoints < 1:
            raise RecipeError(f"train.keep_checkpoints must be >= 1, got {self.train.keep_checkpoints}")
        if self.optim.warmup_steps < 0:
            raise RecipeError(f"optim.warmup_steps must be >= 0, got {self.optim.warmup_steps}")
        if self.model.quantize and self.adapter.kind == "full":
            raise RecipeError("model.quantize needs adapter.kind=lora: a quantized base cannot be fully fine-tuned")
        if self.output.push_to_hub and not self.output.hub_repo_id:
            raise RecipeError("output.push_to_hub=true needs output.hub_repo_id (e.g. user/my-lora)")
        return self

    def _check_pixel_art(self) -> None:
        v = self.validation
        if v.pixel_grid is not None and v.pixel_grid < 1:
            raise RecipeError(f"validation.pixel_grid must be >= 1 (cells a side), got {v.pixel_grid}")
        if isinstance(v.palette, str) and v.palette.strip().lstrip("-").isdigit():
            v.palette = int(v.palette)
        if isinstance(v.palette, int) and not 1 <= v.palette <= 256:
            raise RecipeError(f"validation.palette={v.palette}: a number of colours must be in 1..256")
        if isinstance(v.palette, str) and v.palette != "data" and not Path(v.palette).expanduser().is_file():
            raise RecipeError(f"validation.palette={v.palette}: no such file (give a number of colours, a .hex or .gpl "
                              "palette, an image, or data)")

    def _check_lycoris(self) -> None:
        a = self.adapter
        if a.kind not in ("lokr", "loha"):
            return
        if a.text_encoder:
            raise RecipeError(f"adapter.kind={a.kind} trains the U-ViT only: set adapter.text_encoder=false or use "
                              "adapter.kind=lora")
        if self.model.quantize:
            raise RecipeError(f"model.quantize needs adapter.kind=lora or dora: peft's {a.kind} cannot wrap 8/4-bit "
                              "layers")
        if a.dropout:
            raise RecipeError(f"adapter.dropout is LoRA's input dropout: adapter.kind={a.kind} has none, set it to 0")

    def _check_styledrop(self) -> None:
        s = self.styledrop
        if s.rounds < 1:
            raise RecipeError(f"styledrop.rounds must be >= 1 (1: no feedback round), got {s.rounds}")
        if s.per_prompt < 1 or s.batch_size < 1:
            raise RecipeError(f"styledrop.per_prompt and styledrop.batch_size must be >= 1, got {s.per_prompt} and "
                              f"{s.batch_size}")
        if not s.adapter_scales or min(s.adapter_scales) <= 0:
            raise RecipeError(f"styledrop.adapter_scales must be numbers > 0 (1: the adapter as trained), got "
                              f"{list(s.adapter_scales)}")
        if s.rounds == 1:
            return
        if not s.prompts:
            raise RecipeError("styledrop.rounds > 1 draws candidates for styledrop.prompts: set them (a list, or a "
                              "text file with one prompt per line), or set styledrop.rounds=1")
        if self.adapter.kind == "full":
            raise RecipeError("styledrop.rounds > 1 draws candidates with the round's adapter: use adapter.kind=lora "
                              "(or dora), or set styledrop.rounds=1")
        picker = s.picker(self.model.base)
        if picker == "toy" and self.model.base != "toy":
            raise RecipeError(f"styledrop.pick=toy reads the toy world's images, but model.base={self.model.base}: "
                              "set styledrop.pick=clip with styledrop.clip_model, or styledrop.rounds=1")
        if picker == "clip" and not s.clip_model:
            raise RecipeError("styledrop.pick=clip needs styledrop.clip_model (e.g. openai/clip-vit-base-patch32), "
                              "or set styledrop.rounds=1 to train round 1 only")

    def _check_optimizer(self) -> None:
        o = self.optim
        if o.adam_8bit and o.name not in ("adamw", "adamw8bit"):
            raise RecipeError(f"optim.adam_8bit=true asks for 8-bit AdamW but optim.name={o.name}: drop one of them")
        if o.lr is None or o.betas is None:
            raise RecipeError("optim.lr and optim.betas are unset: call Recipe.resolve() before validate()")
        if not all(0 <= b < 1 for b in o.betas):
            raise RecipeError(f"optim.betas must be two numbers in [0, 1), got {list(o.betas)}")

    def _check_sources(self) -> None:
        d = self.data
        if not d.sources:
            return
        if d.card or d.source or d.path:
            raise RecipeError("data.sources replaces data.card/source/path: put every source in the list "
                              "(e.g. data.sources: [{card: nouns, repeats: 2}, {source: folder, path: reg/}])")
        for i, s in enumerate(d.sources):
            if s.repeats < 1:
                raise RecipeError(f"data.sources[{i}].repeats must be >= 1, got {s.repeats}")
            if not (s.card or (s.source and s.path)):
                raise RecipeError(f"data.sources[{i}] needs a card, or a source and a path")

    def _check_captions(self) -> None:
        d = self.data
        if d.caption_dropout is not None and not 0 <= d.caption_dropout <= 1:
            raise RecipeError(f"data.caption_dropout must be in [0, 1], got {d.caption_dropout}")
        if d.keep_tags < 0:
            raise RecipeError(f"data.keep_tags must be >= 0, got {d.keep_tags}")
        if d.keep_tags and not d.shuffle_tags:
            raise RecipeError(f"data.keep_tags={d.keep_tags} only applies to shuffled tags: set data.shuffle_tags=true")

    def _expand(self, template: str) -> str:
        def value(match: re.Match) -> str:
            section, key = match.group(1), match.group(2)
            if not hasattr(getattr(self, section, None), key):
                raise RecipeError(f"output.dir={template!r}: {{{section}.{key}}} is not a recipe key")
            return str(getattr(getattr(self, section), key))

        return re.sub(r"\{(\w+)\.(\w+)\}", value, template)

    def to_dict(self) -> dict:
        return asdict(self)
