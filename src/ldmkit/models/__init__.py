"""The networks. One file per network, plus shared blocks (resnet, attention, embeddings)."""

from .attention import Attention, BasicTransformerBlock, FeedForward, Transformer2DModel
from .autoencoder_kl import AutoencoderKL, AutoencoderKLOutput
from .class_embedder import ClassEmbedder
from .embeddings import TimestepEmbedding, Timesteps, timestep_embedding
from .ldmbert import LDMBertModel
from .modeling_utils import ModelMixin
from .resnet import Downsample2D, ResnetBlock2D, Upsample2D
from .unet_2d import UNet2DModel, UNet2DOutput
from .unet_2d_condition import UNet2DConditionModel, UNet2DConditionOutput
from .vae import Decoder, DecoderOutput, DiagonalGaussianDistribution, Encoder, VectorQuantizer
from .vq_model import VQEncoderOutput, VQModel

__all__ = [
    "Attention",
    "AutoencoderKL",
    "AutoencoderKLOutput",
    "BasicTransformerBlock",
    "ClassEmbedder",
    "Decoder",
    "DecoderOutput",
    "DiagonalGaussianDistribution",
    "Downsample2D",
    "Encoder",
    "FeedForward",
    "LDMBertModel",
    "ModelMixin",
    "ResnetBlock2D",
    "TimestepEmbedding",
    "Timesteps",
    "Transformer2DModel",
    "UNet2DConditionModel",
    "UNet2DConditionOutput",
    "UNet2DModel",
    "UNet2DOutput",
    "Upsample2D",
    "VQEncoderOutput",
    "VQModel",
    "VectorQuantizer",
    "timestep_embedding",
]
